//! Reconcile errors, and how each maps to a condition reason and a retry policy.

use std::time::Duration;

/// What can go wrong while reconciling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The apiserver refused or failed a request: usually transient.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The spec cannot be acted on until the user changes it.
    #[error("{message}")]
    InvalidSpec { reason: &'static str, message: String },
    /// Something the object depends on is not there yet (or not gone yet); retry soon.
    #[error("{0}")]
    Waiting(String),
    /// The finalizer helper failed to add or remove the finalizer.
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// Key generation or encoding failed.
    #[error("cryptography: {0}")]
    Crypto(String),
    /// An object could not be serialized for the apiserver.
    #[error("serialization: {0}")]
    Serialization(#[from] serde_json::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The `reason` of the condition and Event that report this error.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesError",
            Error::InvalidSpec { reason, .. } => reason,
            Error::Waiting(_) => "Waiting",
            Error::Finalizer(_) => "FinalizerError",
            Error::Crypto(_) => "KeyGenerationFailed",
            Error::Serialization(_) => "SerializationFailed",
        }
    }

    /// Whether retrying without a change to the object can help.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Kube(_) | Error::Waiting(_) | Error::Finalizer(_) | Error::Crypto(_) => true,
            Error::InvalidSpec { .. } | Error::Serialization(_) => false,
        }
    }

    /// A short delay for conditions that resolve by themselves (a namespace finishing deleting).
    pub fn fixed_delay(&self) -> Option<Duration> {
        matches!(self, Error::Waiting(_)).then_some(Duration::from_secs(2))
    }
}

impl From<kube::runtime::finalizer::Error<Error>> for Error {
    /// Apply and cleanup errors are ours: keep their kind so the retry policy sees it.
    fn from(err: kube::runtime::finalizer::Error<Error>) -> Self {
        use kube::runtime::finalizer::Error as F;
        match err {
            F::ApplyFailed(e) | F::CleanupFailed(e) => e,
            F::AddFinalizer(e) | F::RemoveFinalizer(e) => Error::Kube(e),
            F::UnnamedObject => Error::Finalizer("object has no name".into()),
            F::InvalidFinalizer => Error::Finalizer("invalid finalizer name".into()),
        }
    }
}
