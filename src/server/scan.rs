//! Byte scanning for the sink: finding line ends, finding the end of DATA content, and undoing
//! dot-stuffing.
//!
//! These are the sink's hot loops: content that is not captured is scanned once, in place, and
//! never copied. Nothing here allocates, and nothing here knows about sockets or replies.

/// Octets of a 64-bit word, each set to 0x01 (the usual "has a zero byte" trick).
const LOW_BITS: u64 = 0x0101_0101_0101_0101;
/// Octets of a 64-bit word, each set to 0x80.
const HIGH_BITS: u64 = 0x8080_8080_8080_8080;

/// Index of the first `needle` in `haystack`.
///
/// Compares eight octets per step: `iter().position` cannot be vectorised because of its early
/// exit, and the sink runs over every octet of every message with this.
pub(super) fn find_byte(needle: u8, haystack: &[u8]) -> Option<usize> {
    let pattern = LOW_BITS * u64::from(needle);
    let mut words = haystack.chunks_exact(8);
    let mut offset = 0;
    for word in &mut words {
        let bytes: [u8; 8] = word.try_into().expect("chunks_exact yields 8 octets");
        let diff = u64::from_le_bytes(bytes) ^ pattern;
        // A zero octet in `diff` is a match. Borrows only travel upwards, so the lowest flagged
        // octet is always a true match (the trick's false positives sit above a true one).
        let found = diff.wrapping_sub(LOW_BITS) & !diff & HIGH_BITS;
        if found != 0 {
            return Some(offset + (found.trailing_zeros() / 8) as usize);
        }
        offset += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&b| b == needle)
        .map(|i| offset + i)
}

/// The end-of-data indication, RFC 5321 4.1.1.4.
const END_OF_DATA: &[u8; 5] = b"\r\n.\r\n";

/// Finds `CRLF.CRLF` in DATA content that arrives in pieces of any size.
///
/// Only the strict sequence ends the content: a bare LF or bare CR around the dot does not
/// (accepting those is what makes SMTP smuggling possible).
#[derive(Debug, Clone, Copy)]
pub(super) struct EndOfData {
    /// How many octets of [`END_OF_DATA`] the content seen so far ends with.
    matched: usize,
}

impl EndOfData {
    /// A scanner for content that starts right after the DATA command line.
    ///
    /// The CRLF that ends the DATA line counts as the first CRLF of the end sequence (RFC 5321
    /// 4.1.1.4), so an empty message is just ".CRLF".
    pub(super) fn after_data_command() -> Self {
        EndOfData { matched: 2 }
    }

    /// Scans the next piece of content. Returns how many octets of `piece` belong to the content,
    /// end sequence included, when the end is in this piece; `None` when all of it is content.
    pub(super) fn scan(&mut self, piece: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < piece.len() {
            if self.matched == 0 {
                // Every end sequence starts with CR: skip to the next one at word speed.
                i += find_byte(b'\r', &piece[i..])?;
            }
            let octet = piece[i];
            i += 1;
            self.matched = if octet == END_OF_DATA[self.matched] {
                self.matched + 1
            } else if octet == b'\r' {
                1
            } else {
                0
            };
            if self.matched == END_OF_DATA.len() {
                return Some(i);
            }
        }
        None
    }
}

/// Undoes dot-stuffing in place (RFC 5321 4.5.2): a line that starts with '.' had that '.' added
/// by the client, so it is removed. Lines are CRLF-terminated, as for [`EndOfData`].
pub(super) fn unstuff(content: &mut Vec<u8>) {
    let mut write = 0;
    let mut at_line_start = true;
    let mut after_cr = false;
    for read in 0..content.len() {
        let octet = content[read];
        if at_line_start && octet == b'.' {
            at_line_start = false;
            continue;
        }
        content[write] = octet;
        write += 1;
        at_line_start = after_cr && octet == b'\n';
        after_cr = octet == b'\r';
    }
    content.truncate(write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_byte_agrees_with_a_plain_search() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2000 {
            let len = rng.usize(0..80);
            let haystack: Vec<u8> = (0..len).map(|_| rng.u8(b'\n'..=b'\r')).collect();
            for needle in [b'\n', b'\r', 0x0b, 0x0c, 0x80] {
                assert_eq!(
                    find_byte(needle, &haystack),
                    haystack.iter().position(|&b| b == needle),
                    "{needle} in {haystack:?}"
                );
            }
        }
    }

    /// Feeds `content` to a fresh scanner in pieces of `piece_len` octets.
    fn end_in_pieces(content: &[u8], piece_len: usize) -> Option<usize> {
        let mut scanner = EndOfData::after_data_command();
        let mut offset = 0;
        for piece in content.chunks(piece_len) {
            if let Some(end) = scanner.scan(piece) {
                return Some(offset + end);
            }
            offset += piece.len();
        }
        None
    }

    #[test]
    fn end_of_data_is_found_whatever_the_pieces() {
        let cases: [(&[u8], Option<usize>); 8] = [
            (b".\r\nNEXT", Some(3)),
            (b"a\r\n.\r\nNEXT", Some(6)),
            (b"a\r\n..\r\n.\r\n", Some(10)),
            (b"a\r\r\n.\r\n", Some(7)),
            (b"a\r\n.\r\r\n.\r\n", Some(10)),
            // Bare LF or CR around the dot never ends the content (SMTP smuggling).
            (b"a\n.\nb\r.\r\n.\n", None),
            (b"a\r\n.x\r\n", None),
            (b"", None),
        ];
        for (content, expected) in cases {
            for piece_len in 1..=content.len().max(1) {
                assert_eq!(
                    end_in_pieces(content, piece_len),
                    expected,
                    "{:?} in pieces of {piece_len}",
                    String::from_utf8_lossy(content)
                );
            }
        }
    }

    #[test]
    fn unstuff_removes_one_leading_dot_per_line() {
        let mut content = b".a\r\n..\r\nb.c\r\n.\n.x\r\n".to_vec();
        unstuff(&mut content);
        assert_eq!(content, b"a\r\n.\r\nb.c\r\n\n.x\r\n");
    }
}
