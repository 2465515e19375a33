//! Leader election on a `coordination.k8s.io/v1` Lease in the agent's namespace, so that with
//! several replicas (or the old and new Pod of a rolling update) exactly one runs the
//! controllers and the tunnel.
//!
//! The rules follow client-go's: a holder renews every `retry_period`; a standby takes the
//! Lease once the holder's record has not changed for the holder's `leaseDurationSeconds`, as
//! measured on the standby's own clock (so clock skew between replicas does not matter); every
//! write carries the `resourceVersion` it read, so of two replicas racing for an expired Lease
//! exactly one wins. A holder that cannot renew within `renew_deadline` stops leading, which is
//! shorter than the lease duration so it stops before anyone else may start. On graceful
//! shutdown the holder releases the Lease (empty holder) and a standby takes over at its next
//! retry instead of after a full lease duration.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};

/// Settings of the election (`--leader-elect` and friends).
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    /// Namespace of the Lease (the agent's own).
    pub namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// Who this replica is (the Pod name), written as the Lease's holder.
    pub identity: String,
    /// How long a standby waits on an unchanged Lease before taking it.
    pub lease_duration: Duration,
    /// How long a leader keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// How often the leader renews and a standby retries.
    pub retry_period: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("invalid leader election settings: {0}")]
    Config(String),
    #[error("lost the lease {lease}: {reason}")]
    Lost { lease: String, reason: String },
}

impl LeaderConfig {
    /// The renew deadline must end before the lease does, or two replicas could lead at once.
    pub fn validate(&self) -> Result<(), LeaderError> {
        if self.renew_deadline >= self.lease_duration {
            return Err(LeaderError::Config(
                "the renew deadline must be shorter than the lease duration".into(),
            ));
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return Err(LeaderError::Config(
                "the retry period must be positive and shorter than the renew deadline".into(),
            ));
        }
        if self.identity.is_empty() {
            return Err(LeaderError::Config("the identity must not be empty".into()));
        }
        Ok(())
    }
}

/// What this replica last saw in the Lease, and when it saw it change.
struct Observed {
    holder: String,
    renew_time: Option<String>,
    lease_duration: Duration,
    since: Instant,
}

/// One replica's side of the election.
pub struct Elector {
    api: Api<Lease>,
    config: LeaderConfig,
    observed: Option<Observed>,
}

impl Elector {
    pub fn new(client: kube::Client, config: LeaderConfig) -> Result<Self, LeaderError> {
        config.validate()?;
        Ok(Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
        })
    }

    pub fn identity(&self) -> &str {
        &self.config.identity
    }

    /// Waits until this replica holds the Lease (`true`) or `stop` resolves (`false`);
    /// `standing_by` runs each time the Lease was read and another replica holds it.
    pub async fn acquire(
        &mut self,
        stop: impl std::future::Future<Output = ()>,
        mut standing_by: impl FnMut(),
    ) -> bool {
        tokio::pin!(stop);
        let mut reported = String::new();
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(identity = %self.config.identity, lease = %self.config.lease_name, "acquired the lease: leading");
                    return true;
                }
                Ok(false) => {
                    standing_by();
                    let holder = self.holder().to_string();
                    if holder != reported {
                        tracing::info!(leader = %holder, "standing by: another replica holds the lease");
                        reported = holder;
                    }
                }
                Err(err) => tracing::warn!(%err, "cannot read or write the lease; retrying"),
            }
            tokio::select! {
                _ = &mut stop => return false,
                _ = tokio::time::sleep(self.config.retry_period) => {}
            }
        }
    }

    /// Renews the Lease until `stop` resolves (`Ok`) or leadership is lost (`Err`): another
    /// replica holds it, or no renewal succeeded within the renew deadline.
    pub async fn hold(&mut self, stop: impl std::future::Future<Output = ()>) -> Result<(), LeaderError> {
        tokio::pin!(stop);
        let mut renewed = Instant::now();
        loop {
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = tokio::time::sleep(self.config.retry_period) => {}
            }
            let attempt = tokio::time::timeout(self.config.renew_deadline, self.try_acquire_or_renew()).await;
            match attempt {
                Ok(Ok(true)) => renewed = Instant::now(),
                Ok(Ok(false)) => {
                    return Err(self.lost(format!("{} holds it now", self.holder())));
                }
                Ok(Err(err)) => tracing::warn!(%err, "cannot renew the lease; retrying"),
                Err(_) => tracing::warn!("renewing the lease timed out; retrying"),
            }
            if renewed.elapsed() >= self.config.renew_deadline {
                return Err(self.lost(format!(
                    "no renewal succeeded within {:?}",
                    self.config.renew_deadline
                )));
            }
        }
    }

    /// Gives the Lease up (if still held) so that a standby takes over at once.
    pub async fn release(&mut self) {
        let result = async {
            let Some(mut lease) = self.api.get_opt(&self.config.lease_name).await? else {
                return Ok(false);
            };
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
                return Ok(false);
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            self.api
                .replace(&self.config.lease_name, &PostParams::default(), &lease)
                .await
                .map(|_| true)
        }
        .await;
        match result {
            Ok(true) => tracing::info!("released the lease"),
            Ok(false) => {}
            Err(err) => {
                tracing::warn!(%err, "could not release the lease; a standby takes over when it expires")
            }
        }
    }

    fn lost(&self, reason: String) -> LeaderError {
        LeaderError::Lost {
            lease: format!("{}/{}", self.config.namespace, self.config.lease_name),
            reason,
        }
    }

    fn holder(&self) -> &str {
        self.observed
            .as_ref()
            .map(|o| o.holder.as_str())
            .unwrap_or_default()
    }

    /// One round: create the Lease, renew it, or take it over if it expired or was released.
    /// `Ok(true)` when this replica holds it afterwards; conflicts mean another replica won.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let duration_seconds = i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.config.lease_name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.lease_name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(duration_seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return conflict_is_false(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let renew_time = spec.renew_time.as_ref().map(|t| t.0.to_string());
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|o| o.holder != holder || o.renew_time != renew_time);
        if changed {
            self.observed = Some(Observed {
                holder: holder.clone(),
                renew_time,
                lease_duration: Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64),
                since: Instant::now(),
            });
        }
        let mine = holder == self.config.identity;
        if !mine && !holder.is_empty() {
            let observed = self.observed.as_ref().expect("recorded above");
            if observed.since.elapsed() < observed.lease_duration {
                return Ok(false);
            }
            tracing::info!(previous = %holder, "the lease expired: taking over");
        }
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(duration_seconds),
            acquire_time: if mine {
                spec.acquire_time
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!mine)),
            ..spec
        });
        conflict_is_false(
            self.api
                .replace(&self.config.lease_name, &PostParams::default(), &lease)
                .await,
        )
    }
}

/// A write that lost a race (409: the Lease exists, or changed since it was read) means
/// another replica got there first.
fn conflict_is_false(result: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(lease: u64, renew: u64, retry: u64) -> LeaderConfig {
        LeaderConfig {
            namespace: "shapeblock".into(),
            lease_name: "shapeblock-agent".into(),
            identity: "a".into(),
            lease_duration: Duration::from_secs(lease),
            renew_deadline: Duration::from_secs(renew),
            retry_period: Duration::from_secs(retry),
        }
    }

    #[test]
    fn the_renew_deadline_ends_before_the_lease() {
        assert!(config(15, 10, 2).validate().is_ok());
        assert!(config(10, 10, 2).validate().is_err());
        assert!(config(15, 10, 10).validate().is_err());
        assert!(config(15, 10, 0).validate().is_err());
    }
}
