//! The tunnel's identity in a Secret of the agent's namespace: the key (written before the CSR
//! goes out, so a crash mid-enrollment retries with the same key), the certificate, the CA.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};

use super::{FIELD_MANAGER, MANAGED_BY, MANAGED_BY_LABEL};
use crate::tunnel::{Identity, IdentityStore};

/// Default name of the identity Secret.
pub const IDENTITY_SECRET: &str = "shapeblock-agent-identity";

pub struct SecretIdentityStore {
    api: Api<Secret>,
    name: String,
}

impl SecretIdentityStore {
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
        }
    }
}

fn text(data: &BTreeMap<String, ByteString>, key: &str) -> String {
    data.get(key)
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .unwrap_or_default()
}

#[tonic::async_trait]
impl IdentityStore for SecretIdentityStore {
    async fn load(&self) -> Result<Option<Identity>, String> {
        let secret = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| format!("cannot read Secret {}: {e}", self.name))?;
        Ok(secret.and_then(|s| s.data).map(|data| Identity {
            cluster_id: text(&data, "cluster"),
            key_pem: text(&data, "tls.key"),
            cert_pem: text(&data, "tls.crt"),
            ca_pem: text(&data, "ca.crt"),
            not_after: text(&data, "notAfter").parse().unwrap_or(0),
            pending_key_pem: text(&data, "pending.key"),
        }))
    }

    async fn save(&self, identity: &Identity) -> Result<(), String> {
        let entry = |v: &str| ByteString(v.as_bytes().to_vec());
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(BTreeMap::from([(
                    MANAGED_BY_LABEL.to_string(),
                    MANAGED_BY.to_string(),
                )])),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([
                ("cluster".to_string(), entry(&identity.cluster_id)),
                ("tls.key".to_string(), entry(&identity.key_pem)),
                ("tls.crt".to_string(), entry(&identity.cert_pem)),
                ("ca.crt".to_string(), entry(&identity.ca_pem)),
                ("notAfter".to_string(), entry(&identity.not_after.to_string())),
                ("pending.key".to_string(), entry(&identity.pending_key_pem)),
            ])),
            ..Default::default()
        };
        self.api
            .patch(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await
            .map_err(|e| format!("cannot write Secret {}: {e}", self.name))?;
        Ok(())
    }
}
