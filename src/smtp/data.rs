//! Message content on the wire: CRLF normalisation, line-length checks and dot-stuffing.
//!
//! A body is normalised once, when it is submitted: every bare LF and bare CR becomes CRLF and a
//! final CRLF is added when missing, so no input can produce `CRLF.CRLF` before the client means
//! it (the SMTP smuggling family of bugs needs a bare LF or CR to survive to the wire). The
//! normalised form is what BDAT sends (RFC 3030 needs no stuffing); DATA additionally needs a
//! dot before every line that starts with one (RFC 5321 4.5.2), done by [`dot_stuff`]. Nothing
//! here allocates per line.

/// RFC 5322 2.1.1 / RFC 5321 4.5.3.1.6: at most 998 octets per line, CRLF excluded.
pub const MAX_LINE: usize = 998;

/// The facts about a normalised body that the session needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    /// The content with CRLF line endings, ending in CRLF (empty input stays empty).
    pub bytes: Vec<u8>,
    /// Some octet is above 127 (RFC 6152: needs BODY=8BITMIME).
    pub eight_bit: bool,
    /// Some line starts with '.', so DATA needs dot-stuffing.
    pub needs_stuffing: bool,
}

/// A line over [`MAX_LINE`]: its 1-based number and its length without the line ending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTooLong {
    pub line: usize,
    pub length: usize,
}

/// Normalises line endings and checks line lengths.
///
/// Content from a caller usually has CRLF line endings already, so the work is split in two: a
/// scan (memchr over the line endings) checks every line and counts what normalising adds, then
/// the output is written into one allocation of exactly that size, by a single copy when nothing
/// changes.
pub fn normalize(input: &[u8]) -> Result<Normalized, LineTooLong> {
    let scan = scan(input)?;
    let mut bytes = Vec::with_capacity(input.len() + scan.added);
    if scan.added == 0 {
        bytes.extend_from_slice(input);
    } else {
        let mut start = 0;
        for end in memchr::memchr2_iter(b'\r', b'\n', input) {
            if end < start {
                // The LF of a CRLF, copied with its CR.
                continue;
            }
            bytes.extend_from_slice(&input[start..end]);
            bytes.extend_from_slice(b"\r\n");
            start = end + 1;
            if input[end] == b'\r' && input.get(end + 1) == Some(&b'\n') {
                start += 1;
            }
        }
        if start < input.len() {
            bytes.extend_from_slice(&input[start..]);
            bytes.extend_from_slice(b"\r\n");
        }
    }
    debug_assert_eq!(bytes.len(), bytes.capacity());
    Ok(Normalized {
        bytes,
        eight_bit: scan.eight_bit,
        needs_stuffing: scan.needs_stuffing,
    })
}

/// What [`normalize`] learns before writing anything.
struct Scan {
    /// Octets normalising adds: one for each bare LF or bare CR, two for a missing final CRLF.
    added: usize,
    eight_bit: bool,
    needs_stuffing: bool,
}

fn scan(input: &[u8]) -> Result<Scan, LineTooLong> {
    let mut added = 0;
    let mut needs_stuffing = false;
    let mut line_no = 1usize;
    let mut start = 0;
    let mut check = |start: usize, end: usize, line_no: usize| {
        if end - start > MAX_LINE {
            return Err(LineTooLong {
                line: line_no,
                length: end - start,
            });
        }
        needs_stuffing |= input.get(start) == Some(&b'.') && start < end;
        Ok(())
    };
    for end in memchr::memchr2_iter(b'\r', b'\n', input) {
        if end < start {
            continue;
        }
        check(start, end, line_no)?;
        start = end + 1;
        if input[end] == b'\r' && input.get(end + 1) == Some(&b'\n') {
            start += 1;
        } else {
            added += 1;
        }
        line_no += 1;
    }
    if start < input.len() {
        check(start, input.len(), line_no)?;
        added += 2;
    }
    Ok(Scan {
        added,
        eight_bit: !input.is_ascii(),
        needs_stuffing,
    })
}

/// Appends `normalized` with a dot added before every line that starts with '.', as DATA
/// requires (RFC 5321 4.5.2). The input must come from [`normalize`].
pub fn dot_stuff(normalized: &[u8], out: &mut Vec<u8>) {
    out.reserve(normalized.len() + 16);
    let mut at_line_start = true;
    let mut start = 0;
    for (i, &b) in normalized.iter().enumerate() {
        if at_line_start && b == b'.' {
            out.extend_from_slice(&normalized[start..i]);
            out.push(b'.');
            start = i;
        }
        at_line_start = b == b'\n';
    }
    out.extend_from_slice(&normalized[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn norm(input: &[u8]) -> Vec<u8> {
        normalize(input).unwrap().bytes
    }

    #[test]
    fn line_endings() {
        assert_eq!(norm(b"a\nb\rc\r\nd"), b"a\r\nb\r\nc\r\nd\r\n");
        assert_eq!(norm(b"a\r\r\nb"), b"a\r\n\r\nb\r\n");
        assert_eq!(norm(b""), b"");
        assert_eq!(norm(b"\n"), b"\r\n");
    }

    #[test]
    fn smuggling_inputs_are_neutralised() {
        for input in [
            &b"a\n.\nb"[..],
            b"a\r.\rb",
            b"a\r\n.\nb",
            b"a\n.\r\nb",
            b".",
            b"\r\n.\r\n",
        ] {
            let n = normalize(input).unwrap();
            let mut stuffed = Vec::new();
            dot_stuff(&n.bytes, &mut stuffed);
            stuffed.extend_from_slice(b".\r\n");
            let end = stuffed.windows(5).position(|w| w == b"\r\n.\r\n");
            assert_eq!(
                end,
                Some(stuffed.len() - 5),
                "input {input:?} -> {stuffed:?}"
            );
            assert!(n.needs_stuffing);
        }
    }

    #[test]
    fn stuffing() {
        let mut out = Vec::new();
        dot_stuff(b".a\r\nb\r\n..c\r\n.\r\n", &mut out);
        assert_eq!(out, b"..a\r\nb\r\n...c\r\n..\r\n");
    }

    #[test]
    fn flags_and_limits() {
        let n = normalize("héllo\r\n".as_bytes()).unwrap();
        assert!(n.eight_bit && !n.needs_stuffing);
        let ok = vec![b'x'; MAX_LINE];
        assert!(normalize(&ok).is_ok());
        let long = [b"a\r\n".as_slice(), &[b'x'; MAX_LINE + 1]].concat();
        assert_eq!(
            normalize(&long),
            Err(LineTooLong {
                line: 2,
                length: MAX_LINE + 1
            })
        );
    }

    /// The rule, one byte at a time: what `normalize` must give for any input.
    fn reference(input: &[u8]) -> Result<Normalized, LineTooLong> {
        let (mut bytes, mut line, mut length) = (Vec::new(), 1, 0);
        let (mut eight_bit, mut needs_stuffing) = (false, false);
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            if b == b'\r' || b == b'\n' {
                bytes.extend_from_slice(b"\r\n");
                i += if b == b'\r' && input.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                (line, length) = (line + 1, 0);
                continue;
            }
            needs_stuffing |= length == 0 && b == b'.';
            eight_bit |= b >= 0x80;
            length += 1;
            if length > MAX_LINE {
                let rest = &input[i..];
                let end = rest.iter().position(|&b| b == b'\r' || b == b'\n');
                let length = length - 1 + end.unwrap_or(rest.len());
                return Err(LineTooLong { line, length });
            }
            bytes.push(b);
            i += 1;
        }
        if length > 0 {
            bytes.extend_from_slice(b"\r\n");
        }
        Ok(Normalized {
            bytes,
            eight_bit,
            needs_stuffing,
        })
    }

    proptest! {
        #[test]
        fn normalize_follows_the_rule(
            parts in proptest::collection::vec(prop_oneof![
                Just(&b"."[..]), Just(&b"\r"[..]), Just(&b"\n"[..]), Just(&b"\r\n"[..]),
                Just(&b"a"[..]), Just(&b"\xc3\xa9"[..]), Just(&[b'x'; 500][..]),
            ], 0..40)
        ) {
            let input = parts.concat();
            let got = normalize(&input);
            prop_assert_eq!(&got, &reference(&input));
            if let Ok(n) = got {
                // One allocation of exactly the right size.
                prop_assert_eq!(n.bytes.capacity(), n.bytes.len());
            }
        }

        #[test]
        fn data_never_ends_early(body in proptest::collection::vec(prop_oneof![Just(b'.'), Just(b'\r'), Just(b'\n'), Just(b'a')], 0..64)) {
            let n = normalize(&body).unwrap();
            let mut wire = Vec::new();
            dot_stuff(&n.bytes, &mut wire);
            wire.extend_from_slice(b".\r\n");
            // The only end-of-data sequence is the one we appended.
            let framed = [b"\r\n".as_slice(), &wire].concat();
            let first = framed.windows(5).position(|w| w == b"\r\n.\r\n");
            prop_assert_eq!(first, Some(framed.len() - 5));
            // No bare CR or LF survives.
            for (i, &b) in n.bytes.iter().enumerate() {
                if b == b'\n' { prop_assert!(i > 0 && n.bytes[i - 1] == b'\r'); }
                if b == b'\r' { prop_assert_eq!(n.bytes.get(i + 1), Some(&b'\n')); }
            }
        }
    }
}
