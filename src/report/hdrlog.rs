//! Latency histograms in HdrHistogram's interval-log format (`.hlog`), one tagged interval
//! per endpoint class plus `all`, so that HdrHistogram's own tools (HistogramLogProcessor,
//! HdrHistogramVisualizer) plot and merge them. Values are microseconds; the log's max-value
//! divisor (1000) makes those tools show milliseconds.

use std::time::Duration;

use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2DeflateSerializer;

use super::dataset::{Dataset, Phase};

/// A tag the format accepts: no whitespace, no commas.
fn tag_of(class: &str) -> String {
    class
        .chars()
        .map(|c| match c {
            c if c.is_whitespace() => '_',
            ',' => ';',
            c => c,
        })
        .collect()
}

/// The log of `sides`, each tag prefixed with its side's name (`baseline/`, `candidate/`)
/// when there are several.
pub fn write(sides: &[(&str, &Dataset)], phase: Phase) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut serializer = V2DeflateSerializer::new();
    let labels: Vec<&str> = sides.iter().map(|(_, d)| d.label.as_str()).collect();
    {
        let mut log = IntervalLogWriterBuilder::new()
            .add_comment(&format!(
                "loadtape: {}; {}, microseconds",
                labels.join(" vs "),
                phase.describe()
            ))
            .with_max_value_divisor(1000.0)
            .begin_log_with(&mut out, &mut serializer)
            .map_err(|e| anyhow::anyhow!("cannot write the interval log: {e}"))?;
        for (side, d) in sides {
            let span = Duration::from_secs_f64(d.span_s().max(0.001));
            for (class, c) in d
                .classes
                .iter()
                .chain(std::iter::once((&"all".to_string(), &d.all)))
            {
                let tag = match sides.len() {
                    1 => tag_of(class),
                    _ => format!("{side}/{}", tag_of(class)),
                };
                log.write_histogram(c.latency(phase), Duration::ZERO, span, Tag::new(&tag))
                    .map_err(|e| anyhow::anyhow!("cannot write the histogram of {class}: {e:?}"))?;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn tags_have_no_spaces_or_commas() {
        assert_eq!(
            super::tag_of("GET /v2/{repo}/blobs/{digest}"),
            "GET_/v2/{repo}/blobs/{digest}"
        );
        assert_eq!(super::tag_of("a,b"), "a;b");
    }
}
