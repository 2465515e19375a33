//! Standard `metav1.Condition`s: set one, keeping `lastTransitionTime` when nothing changed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Sets `type_` in `conditions`. The transition time moves only when the status changes, as
/// `meta.SetStatusCondition` does in Go.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            if existing.status != status {
                existing.last_transition_time = Time(Timestamp::now());
            }
            existing.status = status;
            existing.reason = reason.into();
            existing.message = message;
            existing.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.into(),
            status,
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time: Time(Timestamp::now()),
        }),
    }
}

/// Builder over an object's previous conditions, for the status a reconcile writes.
#[derive(Clone, Debug, Default)]
pub struct ConditionSet {
    pub conditions: Vec<Condition>,
    generation: Option<i64>,
}

impl ConditionSet {
    pub fn new(previous: &[Condition], generation: Option<i64>) -> Self {
        Self {
            conditions: previous.to_vec(),
            generation,
        }
    }

    pub fn set(&mut self, type_: &str, status: bool, reason: &str, message: impl Into<String>) -> &mut Self {
        set_condition(
            &mut self.conditions,
            type_,
            status,
            reason,
            message,
            self.generation,
        );
        self
    }

    pub fn is_true(&self, type_: &str) -> bool {
        self.conditions
            .iter()
            .any(|c| c.type_ == type_ && c.status == "True")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut conditions = Vec::new();
        set_condition(&mut conditions, "Ready", false, "Pending", "waiting", Some(1));
        let first = conditions[0].last_transition_time.clone();
        std::thread::sleep(std::time::Duration::from_millis(5));
        set_condition(
            &mut conditions,
            "Ready",
            false,
            "StillPending",
            "still waiting",
            Some(2),
        );
        assert_eq!(conditions[0].last_transition_time, first);
        assert_eq!(conditions[0].reason, "StillPending");
        assert_eq!(conditions[0].observed_generation, Some(2));
        set_condition(&mut conditions, "Ready", true, "Reconciled", "ok", Some(2));
        assert_ne!(conditions[0].last_transition_time, first);
        assert_eq!(conditions.len(), 1);
    }
}
