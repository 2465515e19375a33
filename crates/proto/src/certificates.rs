//! The client certificate policy both sides follow: the hub signs for [`DEFAULT_LIFETIME`]
//! unless told otherwise, and the agent renews at a jittered 70-80 % of a certificate's
//! lifetime (`shapeblock_agent::tunnel::renewal`, where the reasons are).

use std::time::Duration;

/// The hub's default client certificate lifetime.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(45 * 24 * 3600);
/// Renewal starts at this share of the lifetime...
pub const RENEW_FROM: f64 = 0.70;
/// ...plus up to this share, fixed per certificate.
pub const RENEW_JITTER: f64 = 0.10;
/// The hub outage every agent must outlive without re-enrolling.
pub const OUTAGE_TOLERATED: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long a hub outage that begins at the latest renewal point a certificate of `lifetime`
/// can have still leaves the agent able to renew.
pub fn outage_tolerated(lifetime: Duration) -> Duration {
    lifetime.mul_f64(1.0 - RENEW_FROM - RENEW_JITTER)
}
