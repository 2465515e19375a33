//! When the agent renews its client certificate. Pure functions of the certificate and a
//! time, so the policy is tested without waiting weeks.
//!
//! The policy (hub default lifetime [`DEFAULT_LIFETIME`], 45 days): renew once 70 % of the
//! lifetime has passed plus a jitter of up to 10 % that is fixed per certificate (taken from
//! its hash, so every cluster renews at its own moment and a restarted agent keeps it).
//! kubelet rotates its client certificate at a jittered 70-90 % of its lifetime and the
//! open-cluster-management registration agent at about 80 %; the hub's lifetime is chosen so
//! that even at the latest renewal point (80 %) 9 days of validity remain: a hub outage of
//! 7 days that begins just before an agent's renewal leaves it 2 days of grace, and the agent
//! renews on its first connection after the outage (it checks on every connect, not only
//! inside a long session).

use super::Identity;

pub use crate::proto::certificates::{
    DEFAULT_LIFETIME, OUTAGE_TOLERATED, RENEW_FROM, RENEW_JITTER, outage_tolerated,
};

/// `not_before` and `not_after` of a PEM certificate, Unix seconds.
pub fn validity(cert_pem: &str) -> Option<(i64, i64)> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
    crate::proto::validity(&der)
}

/// A fraction in `[0, 1)` from the certificate's bytes.
fn jitter_of(cert_pem: &str) -> f64 {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert_pem.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest.as_ref()[..8]);
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// The Unix second from which a certificate valid from `not_before` to `not_after` is
/// renewed, for a jitter in `[0, 1)`.
pub fn renewal_point(not_before: i64, not_after: i64, jitter: f64) -> i64 {
    let lifetime = (not_after - not_before).max(0) as f64;
    not_before + (lifetime * (RENEW_FROM + RENEW_JITTER * jitter.clamp(0.0, 1.0))) as i64
}

/// When `identity`'s certificate is due for renewal (Unix seconds); `None` when its validity
/// cannot be read (then only `not_after` is known, and the agent renews once less than the
/// default lifetime's margin is left).
pub fn renew_at(identity: &Identity) -> Option<i64> {
    let (not_before, not_after) = validity(&identity.cert_pem)?;
    Some(renewal_point(
        not_before,
        not_after,
        jitter_of(&identity.cert_pem),
    ))
}

/// Whether the certificate should be renewed at `now` (Unix seconds).
pub fn due(identity: &Identity, now: i64) -> bool {
    match renew_at(identity) {
        Some(at) => now >= at,
        None => {
            identity.not_after > 0
                && identity.not_after - now < outage_tolerated(DEFAULT_LIFETIME).as_secs() as i64
        }
    }
}

/// Whether the certificate has expired at `now`.
pub fn expired(identity: &Identity, now: i64) -> bool {
    identity.not_after > 0 && identity.not_after <= now
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const DAY: i64 = 24 * 3600;

    #[test]
    fn the_default_lifetime_outlives_a_week_long_outage_at_any_moment() {
        let lifetime = DEFAULT_LIFETIME.as_secs() as i64;
        // For every jitter, the renewal point leaves more than 7 days; an outage starting at
        // any moment of the certificate's life before that point ends with time to renew.
        for i in 0..=1000 {
            let jitter = i as f64 / 1000.0 * 0.999_999;
            let at = renewal_point(0, lifetime, jitter);
            assert!((31 * DAY..=36 * DAY).contains(&at), "{jitter}: day {}", at / DAY);
            let left = lifetime - at;
            assert!(
                left >= 9 * DAY,
                "{jitter}: {} days left",
                left as f64 / DAY as f64
            );
            assert!(left > OUTAGE_TOLERATED.as_secs() as i64);
        }
        assert_eq!(outage_tolerated(DEFAULT_LIFETIME).as_secs() as i64 / DAY, 9);
        // The 24 h certificates of before tolerated less than 5 hours.
        assert!(outage_tolerated(Duration::from_secs(DAY as u64)) < Duration::from_secs(5 * 3600));
    }

    #[test]
    fn renewal_is_due_from_the_point_on_and_the_jitter_spreads_clusters() {
        let points: Vec<i64> = (0..200)
            .map(|i| renewal_point(0, 100 * DAY, jitter_of(&format!("cert {i}"))))
            .collect();
        let (min, max) = (points.iter().min().unwrap(), points.iter().max().unwrap());
        assert!(*min >= 70 * DAY && *max < 80 * DAY, "{min} {max}");
        assert!(max - min > 8 * DAY, "jitter spreads renewals: {min}..{max}");
        assert_eq!(jitter_of("same"), jitter_of("same"), "fixed per certificate");
    }

    #[test]
    fn a_certificate_at_95_percent_is_due_and_one_at_half_is_not() {
        // A real certificate from the hub's CA, issued as if 95 % of 45 days had passed.
        let dir = tempfile::tempdir().unwrap();
        let ca = shapeblock_hub::pki::Ca::load_or_create(dir.path()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let now = crate::proto::now_unix();
        let lifetime = DEFAULT_LIFETIME;
        let issued = |age: f64| {
            let signed_at = now - (lifetime.as_secs() as f64 * age) as i64;
            let at = time::OffsetDateTime::from_unix_timestamp(signed_at).unwrap();
            let (cert_pem, _) = ca.sign_client_at(&csr, "c", lifetime, at).unwrap();
            let (_, not_after) = validity(&cert_pem).unwrap();
            Identity {
                cert_pem,
                not_after,
                ..Default::default()
            }
        };
        let old = issued(0.95);
        assert!(due(&old, now) && !expired(&old, now));
        let young = issued(0.5);
        assert!(!due(&young, now));
        let gone = issued(1.01);
        assert!(expired(&gone, now));
    }
}
