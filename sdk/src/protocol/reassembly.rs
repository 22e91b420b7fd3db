//! Reassembly of a message sent in chunks (a round's samples, its scores, its result), the
//! same on both sides: chunks of one key (the round) add up until the one marked last, and a
//! sender that sends more items than the receiver allows is an error, not unbounded memory.

use std::fmt;

/// Chunks of one message being put back together.
#[derive(Debug, Clone, PartialEq)]
pub struct Reassembly<T> {
    key: u64,
    limit: usize,
    items: Vec<T>,
}

/// A chunked message that broke its bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooMany {
    /// What the message is for.
    pub key: u64,
    /// Items allowed.
    pub limit: usize,
}

impl fmt::Display for TooMany {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "more than the {} items allowed for round {}",
            self.limit, self.key
        )
    }
}

impl std::error::Error for TooMany {}

impl<T> Reassembly<T> {
    /// An empty message for `key` of at most `limit` items.
    pub fn new(key: u64, limit: usize) -> Self {
        Self {
            key,
            limit,
            items: Vec::with_capacity(limit.min(1 << 16)),
        }
    }

    /// The key (round) the chunks belong to.
    pub fn key(&self) -> u64 {
        self.key
    }

    /// Adds a chunk; the whole message once the `last` chunk is in.
    pub fn push(&mut self, chunk: Vec<T>, last: bool) -> Result<Option<Vec<T>>, TooMany> {
        if self.items.len() + chunk.len() > self.limit {
            return Err(TooMany {
                key: self.key,
                limit: self.limit,
            });
        }
        self.items.extend(chunk);
        Ok(last.then(|| std::mem::take(&mut self.items)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_add_up_to_the_last_and_the_limit_holds() {
        let mut r = Reassembly::new(3, 5);
        assert_eq!(r.push(vec![1, 2], false), Ok(None));
        assert_eq!(r.push(vec![3], true), Ok(Some(vec![1, 2, 3])));
        let mut r = Reassembly::new(3, 2);
        assert_eq!(r.push(vec![1, 2], false), Ok(None));
        let e = r.push(vec![3], true).unwrap_err();
        assert_eq!(e, TooMany { key: 3, limit: 2 });
        assert!(e.to_string().contains("round 3"));
        // An empty message is one empty last chunk.
        assert_eq!(
            Reassembly::<u8>::new(1, 0).push(vec![], true),
            Ok(Some(vec![]))
        );
    }
}
