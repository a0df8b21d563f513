//! loadtape: record production-shaped HTTP traffic in front of Quay/Clair, replay it against a
//! test cluster, and compare.
//!
//! See `ARCHITECTURE.md` for the map. The library holds all logic; the `loadtape` binary only
//! parses flags (`cli`) and calls in here. Data moves one way:
//! record -> [`tape`] -> replay -> results tape -> report.

pub mod endpoint;
pub mod files;
pub mod har;
pub mod inspect;
pub mod percent;
#[cfg(feature = "net")]
pub mod record;
pub mod redact;
#[cfg(feature = "net")]
pub mod replay;
pub mod report;
pub mod select;
pub mod synth;
pub mod tape;
#[cfg(feature = "net")]
pub mod testbed;
#[cfg(feature = "net")]
pub mod tls;
pub mod units;

#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "cli")]
pub mod demo;
