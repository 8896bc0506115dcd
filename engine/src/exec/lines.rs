//! Splits a process's stdout into lines as it arrives (an agent's stream-json), looking at each
//! byte once, and with a bound on how long one line may grow in memory.

/// The longest line passed on. Stream-json lines are at most a few hundred KiB (a tool result,
/// the final result); a longer one is not held in memory: it stays whole in the log, and an
/// [`overlong_notice`] takes its place.
pub const MAX_LINE: usize = 16 << 20;

/// What stands in for a line longer than [`MAX_LINE`]: a JSON object the transcript counts, so
/// that a worker whose result was too long says so instead of "ended without a result".
pub fn overlong_notice(bytes: usize) -> String {
    format!(r#"{{"type":"ccluster_overlong_line","bytes":{bytes}}}"#)
}

/// Cuts bytes into lines. The unfinished last line is kept between calls; only the new bytes of
/// each call are searched for a newline, so a long line costs time in proportion to its length
/// (searching the whole pending buffer after each read made a 16 MB line cost seconds).
#[derive(Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
    /// Length of the line being dropped for exceeding [`MAX_LINE`], if it is.
    dropping: Option<usize>,
}

impl LineSplitter {
    /// Feeds `bytes`, calling `emit` for every line they complete (without its newline).
    pub fn push(&mut self, mut bytes: &[u8], mut emit: impl FnMut(String)) {
        while let Some(i) = bytes.iter().position(|b| *b == b'\n') {
            let (line, rest) = (&bytes[..i], &bytes[i + 1..]);
            match self.dropping.take() {
                Some(n) => emit(overlong_notice(n + line.len())),
                None if self.pending.len() + line.len() > MAX_LINE => {
                    emit(overlong_notice(self.pending.len() + line.len()));
                    self.pending = Vec::new();
                }
                None if self.pending.is_empty() => emit(String::from_utf8_lossy(line).into_owned()),
                None => {
                    self.pending.extend_from_slice(line);
                    emit(String::from_utf8_lossy(&self.pending).into_owned());
                    self.pending.clear();
                }
            }
            bytes = rest;
        }
        match &mut self.dropping {
            Some(n) => *n += bytes.len(),
            None if self.pending.len() + bytes.len() > MAX_LINE => {
                self.dropping = Some(self.pending.len() + bytes.len());
                // Freed, not kept at its peak size for the rest of the process.
                self.pending = Vec::new();
            }
            None => self.pending.extend_from_slice(bytes),
        }
    }

    /// The end of the stream: an unfinished last line is a line too.
    pub fn finish(self, mut emit: impl FnMut(String)) {
        match self.dropping {
            Some(n) => emit(overlong_notice(n)),
            None if !self.pending.is_empty() => {
                emit(String::from_utf8_lossy(&self.pending).into_owned())
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<String> {
        let mut out = Vec::new();
        let mut splitter = LineSplitter::default();
        for chunk in chunks {
            splitter.push(chunk, |l| out.push(l));
        }
        splitter.finish(|l| out.push(l));
        out
    }

    #[test]
    fn lines_split_across_reads_and_several_in_one_read() {
        assert_eq!(
            split(&[b"{\"a\"", b":1}\n{\"b\":2}\n{\"c\"", b":3}\n", b"tail"]),
            ["{\"a\":1}", "{\"b\":2}", "{\"c\":3}", "tail"]
        );
        assert_eq!(split(&[b"\n\n"]), ["", ""]);
        assert!(split(&[b""]).is_empty());
    }

    #[test]
    fn a_line_over_the_limit_is_replaced_by_a_notice_and_the_next_line_is_whole() {
        let chunk = vec![b'x'; 1 << 20];
        let mut chunks: Vec<&[u8]> = vec![b"{\"first\":1}\n"];
        chunks.extend(std::iter::repeat_n(chunk.as_slice(), 17));
        chunks.push(b"\n{\"after\":2}\n");
        assert_eq!(
            split(&chunks),
            [
                "{\"first\":1}".to_string(),
                overlong_notice(17 << 20),
                "{\"after\":2}".to_string()
            ]
        );
        // Over the limit within one read, and unfinished at the end.
        let big = vec![b'y'; MAX_LINE + 1];
        assert_eq!(
            split(&[&big, b"\nok\n"]),
            [overlong_notice(MAX_LINE + 1), "ok".into()]
        );
        assert_eq!(split(&[b"a", &big]), [overlong_notice(MAX_LINE + 2)]);
        // At the limit exactly, the line is passed on.
        let exact = vec![b'z'; MAX_LINE];
        assert_eq!(
            split(&[&exact[..10], &exact[10..], b"\n"])[0].len(),
            MAX_LINE
        );
    }

    #[test]
    fn bytes_that_are_not_utf8_are_replaced_not_lost() {
        assert_eq!(split(&[b"a\xffb\n"]), ["a\u{fffd}b"]);
    }
}
