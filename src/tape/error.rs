//! What can go wrong with a tape, said so that the user knows what to do next.

use std::path::PathBuf;

/// A tape error. Every variant names the file; corruption also names the byte offset.
#[derive(Debug, thiserror::Error)]
pub enum TapeError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{} is not a loadtape tape (it does not start with \"LOADTAPE\"); `loadtape import` turns HAR files into tapes", path.display())]
    NotATape { path: PathBuf },

    #[error("{} is tape format version {found}, newer than the version {supported} this loadtape reads: upgrade loadtape", path.display())]
    NewerVersion {
        path: PathBuf,
        found: u16,
        supported: u16,
    },

    #[error("cannot read tape {}: {reason} at byte {offset}; rerun with --lenient to skip it", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },

    #[error("no tape files (*.tape) in {}", path.display())]
    NoTapes { path: PathBuf },

    #[error("cannot write tape {}: {source}; the frame of {records_lost} records was dropped", path.display())]
    Write {
        path: PathBuf,
        records_lost: u64,
        #[source]
        source: std::io::Error,
    },
}

impl TapeError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> TapeError {
        let path = path.into();
        move |source| TapeError::Io {
            action,
            path,
            source,
        }
    }

    /// True when the tape's bytes are damaged (as opposed to a file that cannot be opened).
    pub fn is_corruption(&self) -> bool {
        matches!(self, TapeError::Corrupt { .. })
    }
}
