//! Percent-encoding of query values (RFC 3986), as registry clients write `scope=` and
//! `digest=`: the stateful replay reads them from recorded targets and writes token requests,
//! the testbed reads them as a server does.

/// `value` with every byte outside the unreserved set percent-encoded.
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `value` with `%XX` escapes decoded (a malformed escape is kept as it is; bytes that do not
/// make UTF-8 are replaced).
pub fn decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let hex = |b: &u8| (*b as char).to_digit(16);
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let (Some(h), Some(l)) = (
                bytes.get(i + 1).and_then(hex),
                bytes.get(i + 2).and_then(hex),
            ) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trips() {
        let scope = "repository:org/app:pull,push";
        assert_eq!(super::encode(scope), "repository%3Aorg%2Fapp%3Apull%2Cpush");
        assert_eq!(super::decode(&super::encode(scope)), scope);
        assert_eq!(super::decode("100%"), "100%");
    }
}
