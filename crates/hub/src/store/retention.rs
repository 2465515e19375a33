//! Retention: what the store forgets, and in what order. A pass ([`super::Store::prune`])
//! deletes in statements of at most [`PRUNE_BATCH`] rows, each its own transaction, so a
//! big backlog never holds a lock long enough to stall recording, and a pass cut short (a
//! replica killed) leaves the store consistent: every rule below holds after each batch.
//!
//! - Events (the feed WatchEvents serves, and the per-cluster agent history): older than
//!   the age, or beyond the newest N of a cluster. Only a prefix in id order is ever
//!   deleted, per cluster, and the highest id pruned is kept per cluster and overall in the
//!   same transaction as the delete, so a cursor older than it is told so (see
//!   [`super::Store::feed_resume`]) instead of resuming over a silent hole.
//! - Log streams: by age, whole streams that ended (eof or truncated) longer ago than the
//!   age; by size, a cluster over its byte cap loses its streams' oldest bytes, streams
//!   whose last write is oldest first: a stream whose bytes all fit in the excess goes
//!   whole if it ended, otherwise its oldest chunks go. A stream's last chunk is never
//!   deleted by the size rule: it is how the store knows where the stream ends, so a stream
//!   being written keeps valid offsets and reading a pruned prefix is refused, not misread.
//! - Commands, objects, clusters, tokens, certificates and idempotency keys are not pruned:
//!   they are current state (and a command's idempotency key is promised for as long as
//!   the command is kept).

use std::time::Duration;

/// Rows one prune statement deletes at most.
pub const PRUNE_BATCH: usize = 1000;

/// The Postgres advisory lock a retention pass holds (session level, on the one pooled
/// connection the pass runs on): one replica prunes at a time, the others skip the round.
pub const RETENTION_LOCK: i64 = 0x5342_4842_0000_0003;

/// What a hub keeps. `None` in a field: that rule is off (keep forever / no cap).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Retention {
    /// Events recorded longer ago than this are pruned.
    pub events_max_age: Option<Duration>,
    /// Of each cluster, only the newest this many events are kept.
    pub events_per_cluster: Option<u64>,
    /// Log streams that ended longer ago than this are pruned.
    pub logs_max_age: Option<Duration>,
    /// Of each cluster, at most this many bytes of log data are kept.
    pub log_bytes_per_cluster: Option<u64>,
}

/// Defaults of `serve` (see README "Retention"): a month of events and logs, at most this
/// many events and log bytes of one cluster, a pass every ten minutes.
pub const DEFAULT_EVENTS_DAYS: u64 = 30;
pub const DEFAULT_EVENTS_PER_CLUSTER: u64 = 100_000;
pub const DEFAULT_LOGS_DAYS: u64 = 30;
pub const DEFAULT_LOG_BYTES_PER_CLUSTER: u64 = 1 << 30;
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(600);

const DAY: Duration = Duration::from_secs(86_400);

impl Retention {
    /// The policy of `serve`'s flags: 0 in any of them turns that rule off.
    pub fn from_flags(
        events_days: u64,
        events_per_cluster: u64,
        logs_days: u64,
        log_bytes_per_cluster: u64,
    ) -> Self {
        let nonzero = |n: u64| (n > 0).then_some(n);
        Self {
            events_max_age: nonzero(events_days).map(|d| DAY.saturating_mul(d.min(u32::MAX as u64) as u32)),
            events_per_cluster: nonzero(events_per_cluster),
            logs_max_age: nonzero(logs_days).map(|d| DAY.saturating_mul(d.min(u32::MAX as u64) as u32)),
            log_bytes_per_cluster: nonzero(log_bytes_per_cluster),
        }
    }

    /// What `serve` keeps when no flag says otherwise.
    pub fn defaults() -> Self {
        Self::from_flags(
            DEFAULT_EVENTS_DAYS,
            DEFAULT_EVENTS_PER_CLUSTER,
            DEFAULT_LOGS_DAYS,
            DEFAULT_LOG_BYTES_PER_CLUSTER,
        )
    }

    /// Whether a pass would prune nothing whatever the store holds.
    pub fn keeps_everything(&self) -> bool {
        *self == Self::default()
    }
}

/// What one pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// False when another replica's pass held the lock: this one did nothing.
    pub ran: bool,
    /// Feed entries (WatchEvents).
    pub feed: u64,
    /// Rows of the agents' event history.
    pub events: u64,
    /// Log chunks, their data bytes, and the streams deleted whole.
    pub log_chunks: u64,
    pub log_bytes: u64,
    pub log_streams: u64,
}

impl Pruned {
    pub(super) fn ran() -> Self {
        Self {
            ran: true,
            ..Default::default()
        }
    }

    pub fn total_rows(&self) -> u64 {
        self.feed + self.events + self.log_chunks
    }
}

/// A stream of a cluster over its cap, as the size rule sees it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct StreamSize {
    pub stream: String,
    /// Data bytes stored.
    pub bytes: u64,
    /// When its last chunk was written (Unix ms).
    pub last_at_ms: i64,
    pub ended: bool,
}

/// What the size rule does to one stream.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Cut {
    /// Delete every chunk (it ended, and all its bytes are within the excess).
    Whole(String),
    /// Delete its oldest chunks, never the last, until at least this many bytes are freed.
    Prefix(String, u64),
}

/// The order the size rule takes a cluster's streams in: oldest last write first.
pub(super) fn oldest_first(streams: &mut [StreamSize]) {
    streams.sort_by(|a, b| (a.last_at_ms, &a.stream).cmp(&(b.last_at_ms, &b.stream)));
}

/// What the size rule does to a stream while `excess` bytes are still over the cap.
pub(super) fn cut(s: &StreamSize, excess: u64) -> Option<Cut> {
    if excess == 0 {
        None
    } else if s.ended && s.bytes <= excess {
        Some(Cut::Whole(s.stream.clone()))
    } else {
        Some(Cut::Prefix(s.stream.clone(), excess))
    }
}

/// A byte count as `serve` takes it: a number, optionally with a binary unit (`K`/`KiB`,
/// `M`/`MiB`, `G`/`GiB`, `T`/`TiB`): `512MiB`, `2G`, `1073741824`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| {
        format!("{text:?} is not a byte count (a number, optionally with KiB, MiB, GiB or TiB)")
    })?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} (KiB, MiB, GiB or TiB: powers of 1024)"
            ));
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is more bytes than the hub counts"))
}

/// Milliseconds of a duration, saturating.
pub(super) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Of the oldest chunks of a stream (offset, bytes), in order: the offset up to which
/// (inclusive) deleting frees at least `need` bytes, or all of them, and the bytes freed.
pub(super) fn prefix_upto(chunks: &[(u64, u64)], need: u64) -> Option<(u64, u64)> {
    let mut freed = 0u64;
    let mut upto = None;
    for (offset, bytes) in chunks {
        if freed >= need {
            break;
        }
        freed += bytes;
        upto = Some(*offset);
    }
    upto.map(|u| (u, freed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(stream: &str, bytes: u64, at: i64, ended: bool) -> StreamSize {
        StreamSize {
            stream: stream.into(),
            bytes,
            last_at_ms: at,
            ended,
        }
    }

    #[test]
    fn the_oldest_streams_go_first_whole_when_they_ended_and_fit_else_by_their_oldest_bytes() {
        let mut streams = vec![
            s("new-ended", 100, 30, true),
            s("old-ended", 40, 10, true),
            s("live", 500, 20, false),
        ];
        oldest_first(&mut streams);
        let names: Vec<&str> = streams.iter().map(|s| s.stream.as_str()).collect();
        assert_eq!(names, ["old-ended", "live", "new-ended"]);
        assert_eq!(
            cut(&streams[0], 30),
            Some(Cut::Prefix("old-ended".into(), 30)),
            "an ended stream larger than the excess keeps its tail"
        );
        assert_eq!(cut(&streams[0], 40), Some(Cut::Whole("old-ended".into())));
        assert_eq!(
            cut(&streams[1], 10_000),
            Some(Cut::Prefix("live".into(), 10_000)),
            "a live stream is never deleted whole"
        );
        assert_eq!(cut(&streams[2], 0), None);
    }

    #[test]
    fn byte_counts_take_binary_units_and_zero_turns_a_rule_off() {
        assert_eq!(parse_bytes("1073741824"), Ok(1 << 30));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes("0"), Ok(0));
        assert!(
            parse_bytes("1GB").is_err(),
            "decimal units are refused, not guessed"
        );
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("99999999999TiB").is_err());
        let off = Retention::from_flags(0, 0, 0, 0);
        assert!(off.keeps_everything());
        let on = Retention::from_flags(1, 5, 2, 10);
        assert_eq!(on.events_max_age, Some(DAY));
        assert_eq!(on.logs_max_age, Some(DAY * 2));
        assert_eq!(
            (on.events_per_cluster, on.log_bytes_per_cluster),
            (Some(5), Some(10))
        );
    }

    #[test]
    fn a_prefix_frees_at_least_what_is_needed_in_whole_chunks() {
        let chunks = [(0, 10), (10, 10), (20, 10)];
        assert_eq!(prefix_upto(&chunks, 1), Some((0, 10)));
        assert_eq!(prefix_upto(&chunks, 11), Some((10, 20)));
        assert_eq!(prefix_upto(&chunks, 100), Some((20, 30)), "all there is");
        assert_eq!(prefix_upto(&[], 5), None);
        assert_eq!(prefix_upto(&chunks, 0), None);
    }
}
