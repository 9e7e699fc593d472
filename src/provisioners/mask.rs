//! Masks secret values in a stream of output bytes, before the output is split into
//! lines, logged, cut or kept for a status message.
//!
//! Masking whole lines missed the common shapes (review A4): a value that ends with
//! a newline (what `kubectl create secret --from-file` stores), a value of several
//! lines (a PEM key, JSON), and a value split by a chunk boundary or by the 8 KiB
//! cut of an endless line. Here the patterns are bytes, a match may span chunks, and
//! only output that could still be the start of a value is held back.

/// What a masked value is replaced with.
pub const MARK: &[u8] = b"<redacted>";

/// One stream's masker.
#[derive(Debug)]
pub struct Masker {
    /// Longest first, so that a value is never half-masked by a shorter one.
    patterns: Vec<Vec<u8>>,
    held: Vec<u8>,
}

impl Masker {
    /// Patterns for each value: the value itself, the value without its trailing
    /// whitespace, and each of its lines (a multi-line value's lines are printed,
    /// and logged, one by one).
    pub fn new(values: &[String]) -> Masker {
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        let mut add = |p: &str| {
            let p = p.trim_end_matches('\r');
            if !p.trim().is_empty() && !patterns.iter().any(|q| q == p.as_bytes()) {
                patterns.push(p.as_bytes().to_vec());
            }
        };
        for v in values {
            add(v);
            add(v.trim_end());
            for line in v.lines() {
                add(line);
                add(line.trim());
            }
        }
        patterns.sort_by_key(|p| std::cmp::Reverse(p.len()));
        Masker {
            patterns,
            held: Vec::new(),
        }
    }

    /// Masks what can be decided and returns it; keeps back only bytes that could
    /// be the start of a value the next chunk completes.
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        self.held.extend_from_slice(data);
        let (out, used) = self.mask(false);
        self.held.drain(..used);
        out
    }

    /// Everything still held, masked: at the end of the stream.
    pub fn flush(&mut self) -> Vec<u8> {
        let (out, _) = self.mask(true);
        self.held.clear();
        out
    }

    /// Masks the held bytes; returns the output and how many held bytes it covers.
    /// Unless at the end, it stops where the rest could still grow into a value: a
    /// shorter value that matches there already is not taken, or the rest of a
    /// longer one would pass unmasked.
    fn mask(&self, end: bool) -> (Vec<u8>, usize) {
        let mut out = Vec::with_capacity(self.held.len());
        let mut i = 0;
        while i < self.held.len() {
            let rest = &self.held[i..];
            if !end
                && self
                    .patterns
                    .iter()
                    .any(|p| p.len() > rest.len() && p.starts_with(rest))
            {
                break;
            }
            match self.patterns.iter().find(|p| rest.starts_with(p)) {
                Some(p) => {
                    out.extend_from_slice(MARK);
                    i += p.len();
                }
                None => {
                    out.push(self.held[i]);
                    i += 1;
                }
            }
        }
        (out, i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `data` in chunks of `size` and returns all that comes out.
    fn through(values: &[&str], data: &[u8], size: usize) -> String {
        let values: Vec<String> = values.iter().map(ToString::to_string).collect();
        let mut m = Masker::new(&values);
        let mut out = Vec::new();
        for chunk in data.chunks(size.max(1)) {
            out.extend(m.push(chunk));
        }
        out.extend(m.flush());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn every_shape_of_a_value_is_masked_in_every_chunking() {
        let long = "S3CR3T-".repeat(40);
        let cases: Vec<(&str, String, &[&str])> = vec![
            // From `kubectl create secret --from-file`: a trailing newline.
            ("hunter2\n", "token is hunter2 ok\n".into(), &["hunter2"]),
            (
                "line-one\nline-two",
                "a line-one\nline-two b\n".into(),
                &["line-one", "line-two"],
            ),
            (
                "-----BEGIN KEY-----\r\nabc\r\n-----END KEY-----\r\n",
                "key: -----BEGIN KEY-----\nabc\n-----END KEY-----\n".into(),
                &["BEGIN KEY", "abc", "END KEY"],
            ),
            (
                long.as_str(),
                format!("{}{long}tail\n", "x".repeat(8190)),
                &["S3CR3T"],
            ),
        ];
        for (value, output, never) in cases {
            for size in [1, 2, 3, 7, 64, 4096, 100_000] {
                let got = through(&[value], output.as_bytes(), size);
                for n in never {
                    assert!(!got.contains(n), "{n:?} in {got:?} (chunks of {size})");
                }
                assert!(got.contains("<redacted>"), "{got:?}");
            }
        }
    }

    #[test]
    fn what_is_not_a_value_passes_unchanged() {
        let text = "plain output, nothing secret\nsecond line\n";
        assert_eq!(through(&["hunter2"], text.as_bytes(), 3), text);
        assert_eq!(through(&[], text.as_bytes(), 3), text);
        // Whitespace-only values would mask everything: they are not patterns.
        assert_eq!(through(&["  \n"], text.as_bytes(), 5), text);
    }

    #[test]
    fn a_value_that_starts_with_another_is_masked_whole() {
        assert_eq!(
            through(&["abc", "abcdef"], b"x abcdef y\n", 1),
            "x <redacted> y\n"
        );
        assert_eq!(through(&["abc", "abcdef"], b"x abcde", 2), "x <redacted>de");
    }

    #[test]
    fn output_that_cannot_be_a_value_is_not_held_back() {
        let mut m = Masker::new(&["hunter2".to_string()]);
        assert_eq!(m.push(b"done\n"), b"done\n");
        assert_eq!(m.push(b"hun"), b"");
        assert_eq!(m.push(b"gry\n"), b"hungry\n");
    }

    #[test]
    fn a_short_value_does_not_rewrite_the_mark_of_a_longer_one() {
        let got = through(&["e", "secret"], b"the secret here\n", 4);
        assert_eq!(got, "th<redacted> <redacted> h<redacted>r<redacted>\n");
    }
}
