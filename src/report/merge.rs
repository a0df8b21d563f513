//! `loadtape merge`: the results tapes of a replay's shards joined into one, as if one
//! replayer had sent everything. Shards started with one `--start-at` share an epoch, so their
//! records interleave on one timeline; statistics built from the merged tape equal the sum of
//! the shards' (histograms add).

use std::path::{Path, PathBuf};

use super::dataset::{ResultsBuilder, Window};
use super::Summary;
use crate::tape::reader::discover;
use crate::tape::{
    ReadOptions, Record, TapeError, TapeHeader, TapeKind, TapeReader, TapeWriter, WriteSummary,
    WriterOptions,
};

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Tape(#[from] TapeError),
    #[error("{path} is a capture tape, not a replay's results: merge takes the --out files of `loadtape replay`")]
    NotResults { path: PathBuf },
    #[error("{path} replayed other tapes than {first} (their `source` lists differ): only shards of one replay merge")]
    OtherSources { path: PathBuf, first: PathBuf },
}

/// What a merge wrote.
pub struct Merged {
    pub records: u64,
    pub inputs: usize,
    pub summary: Summary,
    pub tape: WriteSummary,
}

fn sources(header: &TapeHeader) -> Vec<&str> {
    header
        .options
        .iter()
        .filter(|(k, _)| k == "source")
        .map(|(_, v)| v.as_str())
        .collect()
}

pub fn merge(inputs: &[PathBuf], out: &Path) -> Result<Merged, MergeError> {
    let files = discover(inputs)?;
    let first = files.first().map(|f| (f.path.clone(), f.header.clone()));
    let mut ids = std::collections::HashSet::new();
    for f in &files {
        if f.header.kind != TapeKind::Results {
            return Err(MergeError::NotResults {
                path: f.path.clone(),
            });
        }
        if let Some((first_path, first_header)) = &first {
            if sources(&f.header) != sources(first_header) {
                return Err(MergeError::OtherSources {
                    path: f.path.clone(),
                    first: first_path.clone(),
                });
            }
        }
        ids.insert(f.header.tape_id);
    }
    let reader = TapeReader::from_sources(files, &ReadOptions::default());
    let mut header = TapeHeader::new(TapeKind::Results, "loadtape merge");
    if let Some((_, h)) = &first {
        header.upstream = h.upstream.clone();
        header.options = h
            .options
            .iter()
            .filter(|(k, _)| k == "source")
            .cloned()
            .collect();
    }
    header.epoch_unix_ns = reader.epoch_unix_ns();
    header
        .options
        .push(("merged".into(), ids.len().to_string()));
    let mut writer = TapeWriter::create(out, header, WriterOptions::default())?;
    let mut summary = ResultsBuilder::new(out.display().to_string(), Window::default(), Vec::new());
    let mut records = 0;
    for record in reader {
        let record = record?;
        if let Record::Replayed(r) = &record {
            summary.add(r);
            records += 1;
        }
        writer.write(&record)?;
    }
    Ok(Merged {
        records,
        inputs: ids.len(),
        summary: summary.finish_summary(),
        tape: writer.finish()?,
    })
}
