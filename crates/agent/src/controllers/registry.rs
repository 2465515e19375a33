//! Where a build pushes and with which credential.
//!
//! The cluster registry (`--registry`) is the agent's to scope: every build gets its own
//! short-lived token, minted here with the Docker registry token-auth scheme (the one
//! distribution, Harbor and GitLab verify), that grants `pull,push` on exactly the build's App
//! repository and its layer cache and nothing else. The registry trusts the agent's signing
//! certificate (`auth.token.rootcertbundle`). No build ever sees a credential shared between
//! projects. A tenant's own registry (another host) is pushed to with a Secret the tenant made
//! for it, which must say so (a label and the registry host, settable only by Secret writers).
//!
//! One file past 600 lines: the token, its scope and the Secret checks are one trust decision
//! and are read together when reviewing it.

use std::collections::BTreeMap;

use base64::Engine;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use rustls::pki_types::pem::PemObject;
use serde_json::json;

use crate::api::App;

/// Label that marks a Secret as a registry credential made for that purpose.
pub const CREDENTIAL_LABEL: &str = "apps.shapeblock.io/credential";
/// Value of [`CREDENTIAL_LABEL`] on registry credentials.
pub const CREDENTIAL_REGISTRY: &str = "registry";
/// Annotation naming the registry host (`host[:port]`) a credential Secret is for.
pub const REGISTRY_HOST_ANNOTATION: &str = "apps.shapeblock.io/registry-host";
/// Secret type of docker config credentials.
pub const DOCKER_CONFIG_TYPE: &str = "kubernetes.io/dockerconfigjson";
/// Default name of the signing key Secret in the agent's namespace.
pub const DEFAULT_KEY_SECRET: &str = "shapeblock-registry-token";
/// Token lifetime past the build's deadline: the Job may wait for a node before its clock
/// starts, and the push comes last.
pub const TOKEN_MARGIN_SECONDS: i64 = 600;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The App asks for a destination or credential it may not use; the message says why.
    #[error("{message}")]
    Refused { reason: &'static str, message: String },
    /// The signing key could not be made, read or used.
    #[error("registry token signing key: {0}")]
    Key(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl RegistryError {
    fn refused(reason: &'static str, message: impl Into<String>) -> Self {
        Self::Refused {
            reason,
            message: message.into(),
        }
    }
}

impl From<RegistryError> for super::Error {
    fn from(err: RegistryError) -> Self {
        match err {
            RegistryError::Refused { reason, message } => super::Error::InvalidSpec { reason, message },
            RegistryError::Key(message) => super::Error::Crypto(message),
            RegistryError::Kube(err) => super::Error::Kube(err),
        }
    }
}

/// How builds get their push credential for the cluster registry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PushMode {
    /// A token per build, minted by the agent, for the build's own repositories only.
    #[default]
    Token,
    /// The old behaviour: the project's copy of `--registry-secret` is mounted into builds.
    /// Every tenant's build (its Dockerfile `RUN` steps included) can read it, so any tenant
    /// can push into every other project's repositories and layer cache. Only for a
    /// single-tenant cluster whose registry cannot verify tokens.
    Shared,
}

/// The agent's registry settings (flags `--registry*`).
#[derive(Clone, Debug)]
pub struct RegistrySettings {
    /// The cluster registry, `host[:port]` with an optional path prefix the operator chose
    /// (`registry.shapeblock.io/c-42`); `None`: there is none and every App names its own.
    pub cluster: Option<String>,
    pub push_mode: PushMode,
    /// `iss` of minted tokens: the registry's `auth.token.issuer`.
    pub token_issuer: String,
    /// `aud` of minted tokens: the registry's `auth.token.service`; empty means the host.
    pub token_service: String,
    /// Secret in the agent's namespace holding the signing key (`tls.key`, PKCS#8) and its
    /// self-signed certificate (`tls.crt`); made on first use when missing.
    pub key_secret: String,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            cluster: None,
            push_mode: PushMode::Token,
            token_issuer: "shapeblock-agent".into(),
            token_service: String::new(),
            key_secret: DEFAULT_KEY_SECRET.into(),
        }
    }
}

impl RegistrySettings {
    /// The audience tokens are minted for.
    pub fn service(&self) -> String {
        match (&self.token_service, &self.cluster) {
            (s, _) if !s.is_empty() => s.clone(),
            (_, Some(cluster)) => host_of(cluster).to_owned(),
            (_, None) => String::new(),
        }
    }
}

/// `host[:port]` of a registry reference `host[:port][/path]`.
pub fn host_of(url: &str) -> &str {
    url.split_once('/').map_or(url, |(host, _)| host)
}

/// The host name alone, lower-cased: `Registry.Example.com:5000/x` → `registry.example.com`.
fn hostname_of(url: &str) -> String {
    let host = host_of(url);
    host.rsplit_once(':')
        .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
        .map_or(host, |(name, _)| name)
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// Where an App's builds push, and the credential they use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushTarget {
    /// The cluster registry: the agent scopes the credential to these repositories.
    Cluster {
        /// `host[:port]`, the docker config key.
        host: String,
        /// The App's repository (`[prefix/]project/app`) and its cache (`…/cache`).
        repositories: [String; 2],
    },
    /// The cluster registry with the shared credential (`--registry-push-mode=shared`).
    Shared { secret: String },
    /// The tenant's own registry, with a Secret they made for it (checked by
    /// [`check_own_credential`]).
    Own { secret: String, host: String },
}

/// Decides where an App's builds may push. The destination is always
/// `<registry.url>/<project>/<app>`; inside the cluster registry `registry.url` must be the
/// cluster registry itself (no path of the tenant's choosing, no other port), and elsewhere it
/// needs a credential Secret of the tenant's own.
pub fn push_target(
    app: &App,
    settings: &RegistrySettings,
    shared_secret: Option<&str>,
) -> Result<PushTarget, RegistryError> {
    let url = app.spec.registry.url.as_str();
    let project = app.namespace().unwrap_or_default();
    if let Some(cluster) = settings.cluster.as_deref() {
        // The host is compared as DNS does (case, a trailing dot), the whole reference as
        // written: the destination and the token's docker config key must be the same string.
        let same_host = hostname_of(url) == hostname_of(cluster);
        let exact = url == cluster;
        if same_host && !exact {
            return Err(RegistryError::refused(
                "RegistryPathRefused",
                format!(
                    "registry.url {url} is inside the cluster registry {cluster}, where images of \
                     this App can only go to {cluster}/{project}/{}: set registry.url to {cluster}",
                    app.name_any()
                ),
            ));
        }
        if exact {
            // Naming the project's copy of the pull secret is what leaving it out meant
            // before; any other Secret is refused rather than silently not used.
            let named = app.spec.registry.secret_name.as_deref();
            if let Some(secret) = named.filter(|s| Some(*s) != shared_secret) {
                return Err(RegistryError::refused(
                    "RegistryCredentialRefused",
                    format!(
                        "registry.secretName {secret} cannot be used with the cluster registry \
                         {cluster}: each build gets a push credential for this App's repositories \
                         only; remove registry.secretName"
                    ),
                ));
            }
            return match settings.push_mode {
                PushMode::Token => {
                    let repository = format!(
                        "{}{project}/{}",
                        cluster
                            .split_once('/')
                            .map(|(_, prefix)| format!("{prefix}/"))
                            .unwrap_or_default(),
                        app.name_any()
                    );
                    Ok(PushTarget::Cluster {
                        host: host_of(cluster).to_owned(),
                        repositories: [repository.clone(), format!("{repository}/cache")],
                    })
                }
                PushMode::Shared => match shared_secret {
                    Some(secret) => Ok(PushTarget::Shared {
                        secret: secret.to_owned(),
                    }),
                    None => Err(RegistryError::refused(
                        "RegistryCredentialsMissing",
                        "the agent pushes with a shared credential (--registry-push-mode=shared) \
                         but none is configured (--registry-secret)",
                    )),
                },
            };
        }
    }
    match &app.spec.registry.secret_name {
        Some(secret) => Ok(PushTarget::Own {
            secret: secret.clone(),
            host: host_of(url).to_owned(),
        }),
        None => Err(RegistryError::refused(
            "RegistryCredentialsMissing",
            match &settings.cluster {
                Some(cluster) => format!(
                    "registry {url} is not the cluster registry ({cluster}): name a credential \
                     Secret made for it in registry.secretName, or set registry.url to {cluster}"
                ),
                None => format!(
                    "this cluster has no registry of its own (--registry): name a credential \
                     Secret for {url} in registry.secretName"
                ),
            },
        )),
    }
}

/// Checks that a tenant's registry Secret was made as a push credential for `host`: type
/// `kubernetes.io/dockerconfigjson`, label `apps.shapeblock.io/credential: registry`, and
/// annotation `apps.shapeblock.io/registry-host` naming the host. Only someone allowed to
/// write Secrets can set these, so naming a Secret of the namespace (say, a database password
/// or the project's pull secret) does not hand it to a build.
pub fn check_own_credential(secret: Option<&Secret>, name: &str, host: &str) -> Result<(), RegistryError> {
    let Some(secret) = secret else {
        return Err(RegistryError::refused(
            "RegistrySecretNotFound",
            format!("registry.secretName {name} does not exist"),
        ));
    };
    let refuse = |why: String| {
        Err(RegistryError::refused(
            "RegistrySecretRefused",
            format!(
                "Secret {name} is not a registry credential for {host}: {why} (a credential needs \
                 type {DOCKER_CONFIG_TYPE}, label {CREDENTIAL_LABEL}={CREDENTIAL_REGISTRY} and \
                 annotation {REGISTRY_HOST_ANNOTATION}={host})"
            ),
        ))
    };
    if secret.type_.as_deref() != Some(DOCKER_CONFIG_TYPE) {
        return refuse(format!(
            "its type is {}",
            secret.type_.as_deref().unwrap_or("Opaque")
        ));
    }
    if secret.labels().get(CREDENTIAL_LABEL).map(String::as_str) != Some(CREDENTIAL_REGISTRY) {
        return refuse(format!(
            "it has no label {CREDENTIAL_LABEL}={CREDENTIAL_REGISTRY}"
        ));
    }
    match secret.annotations().get(REGISTRY_HOST_ANNOTATION) {
        Some(marked) if marked.eq_ignore_ascii_case(host) => Ok(()),
        Some(marked) => refuse(format!("it is marked for registry {marked}")),
        None => refuse(format!("it has no annotation {REGISTRY_HOST_ANNOTATION}")),
    }
}

/// Reads and checks a tenant's registry Secret (see [`check_own_credential`]).
pub async fn own_credential(
    client: &Client,
    namespace: &str,
    name: &str,
    host: &str,
) -> Result<(), RegistryError> {
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await?;
    check_own_credential(secret.as_ref(), name, host)
}

/// The Secrets an App's pods (its Deployments, CronJobs, release command and runs) pull
/// with: the project's copy of the cluster's pull secret (`--registry-secret`, same name)
/// when the agent has one, and the App's own registry credential when its images come from
/// another registry (the Secret its builds push with; [`pull_secrets_checked`] also checks
/// it is marked for that host). Pushing was never enough: a private registry refuses the
/// kubelet's anonymous pull and the pods stay in `ImagePullBackOff`.
pub fn pull_secrets(app: &App, settings: &RegistrySettings, shared_secret: Option<&str>) -> Vec<String> {
    let mut names: Vec<String> = shared_secret.map(str::to_owned).into_iter().collect();
    if let Ok(PushTarget::Own { secret, .. }) = push_target(app, settings, shared_secret)
        && !names.contains(&secret)
    {
        names.push(secret);
    }
    names
}

/// [`pull_secrets`], with the App's own credential left out unless it is one made for its
/// registry (as a build would refuse it).
pub async fn pull_secrets_checked(
    client: &Client,
    app: &App,
    settings: &RegistrySettings,
    shared_secret: Option<&str>,
) -> Result<Vec<String>, RegistryError> {
    let mut names = pull_secrets(app, settings, shared_secret);
    if let Ok(PushTarget::Own { secret, host }) = push_target(app, settings, shared_secret) {
        let namespace = app.namespace().unwrap_or_default();
        match own_credential(client, &namespace, &secret, &host).await {
            Ok(()) => {}
            Err(RegistryError::Refused { message, .. }) => {
                tracing::debug!(app = %app.name_any(), %message, "not pulling with the App's registry Secret");
                names.retain(|n| *n != secret || Some(n.as_str()) == shared_secret);
            }
            Err(err) => return Err(err),
        }
    }
    Ok(names)
}

/// Name of a build's own push Secret.
pub fn push_secret_name(build: &str) -> String {
    format!("{build}-push")
}

/// A build's push Secret: a docker config whose only entry is `registrytoken` for the cluster
/// registry, which go-containerregistry (kaniko, the CNB lifecycle) sends as the bearer token
/// as it is, without a token exchange. Owned by the AppBuild.
pub fn push_secret(
    namespace: &str,
    name: &str,
    labels: BTreeMap<String, String>,
    owner: &OwnerReference,
    host: &str,
    token: &str,
) -> Secret {
    let config = json!({"auths": {host: {"registrytoken": token}}});
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(labels),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        type_: Some(DOCKER_CONFIG_TYPE.into()),
        data: Some(BTreeMap::from([(
            ".dockerconfigjson".to_string(),
            ByteString(config.to_string().into_bytes()),
        )])),
        ..Default::default()
    }
}

/// The agent's token signing key: ECDSA P-256, with a self-signed certificate that the
/// registry lists in `auth.token.rootcertbundle`.
pub struct Signer {
    key: ring::signature::EcdsaKeyPair,
    /// PEM of the self-signed certificate.
    pub cert_pem: String,
    /// The key id in libtrust's format, which distribution matches against the keys of its
    /// root certificates.
    pub key_id: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A new key and its certificate.
    pub fn generate() -> Result<(Self, String), RegistryError> {
        let key = rcgen::KeyPair::generate().map_err(|e| RegistryError::Key(e.to_string()))?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            "shapeblock-agent registry token signer",
        );
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2054, 1, 1);
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let cert = params
            .self_signed(&key)
            .map_err(|e| RegistryError::Key(e.to_string()))?;
        let key_pem = key.serialize_pem();
        Ok((Self::from_pem(&key_pem, &cert.pem())?, key_pem))
    }

    /// From a PKCS#8 PEM key and the PEM certificate of its public key.
    pub fn from_pem(key_pem: &str, cert_pem: &str) -> Result<Self, RegistryError> {
        let bad = |e: String| RegistryError::Key(e);
        let parsed = rcgen::KeyPair::from_pem(key_pem).map_err(|e| bad(format!("tls.key: {e}")))?;
        if parsed.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(bad("tls.key is not an ECDSA P-256 key".into()));
        }
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            parsed.serialized_der(),
            &ring::rand::SystemRandom::new(),
        )
        .map_err(|e| bad(format!("tls.key: {e}")))?;
        let spki = rcgen::PublicKeyData::subject_public_key_info(&parsed);
        let cert_der = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| bad(format!("tls.crt: {e}")))?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&cert_der).map_err(|e| bad(format!("tls.crt: {e}")))?;
        if cert.public_key().raw != spki.as_slice() {
            return Err(bad("tls.crt is not the certificate of tls.key".into()));
        }
        Ok(Self {
            key,
            cert_pem: cert_pem.to_owned(),
            key_id: libtrust_key_id(&spki),
        })
    }

    /// A compact JWS (ES256) granting `pull,push` on `repositories` to whoever holds it,
    /// valid from now for `lifetime_seconds`.
    pub fn mint(
        &self,
        issuer: &str,
        service: &str,
        subject: &str,
        repositories: &[String],
        lifetime_seconds: i64,
    ) -> Result<String, RegistryError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.mint_at(
            issuer,
            service,
            subject,
            repositories,
            now,
            now + lifetime_seconds,
        )
    }

    /// [`Signer::mint`] with explicit times (tests mint expired tokens).
    pub fn mint_at(
        &self,
        issuer: &str,
        service: &str,
        subject: &str,
        repositories: &[String],
        not_before: i64,
        expires: i64,
    ) -> Result<String, RegistryError> {
        self.mint_actions(
            issuer,
            service,
            subject,
            repositories,
            &["pull", "push"],
            not_before,
            expires,
        )
    }

    /// A token granting `actions` on `repositories`, from `not_before` to `expires` (a token
    /// service's pull tokens: `["pull"]`).
    #[allow(clippy::too_many_arguments)]
    pub fn mint_actions(
        &self,
        issuer: &str,
        service: &str,
        subject: &str,
        repositories: &[String],
        actions: &[&str],
        not_before: i64,
        expires: i64,
    ) -> Result<String, RegistryError> {
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let mut jti = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut jti)
            .map_err(|_| RegistryError::Key("no randomness".into()))?;
        let header = json!({"typ": "JWT", "alg": "ES256", "kid": self.key_id});
        let claims = json!({
            "iss": issuer,
            "sub": subject,
            "aud": service,
            "iat": not_before,
            "nbf": not_before,
            "exp": expires,
            "jti": crate::proto::hex(&jti),
            "access": repositories.iter().map(|name| json!({
                "type": "repository", "name": name, "actions": actions,
            })).collect::<Vec<_>>(),
        });
        let signing_input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = self
            .key
            .sign(&ring::rand::SystemRandom::new(), signing_input.as_bytes())
            .map_err(|_| RegistryError::Key("signing failed".into()))?;
        Ok(format!("{signing_input}.{}", b64(signature.as_ref())))
    }
}

/// libtrust's key id: the first 240 bits of the SHA-256 of the DER public key
/// (SubjectPublicKeyInfo), base32, in twelve groups of four joined by `:`.
pub fn libtrust_key_id(spki_der: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = ring::digest::digest(&ring::digest::SHA256, spki_der);
    let bytes = &digest.as_ref()[..30];
    // 240 bits are 48 base32 digits exactly: no padding.
    let mut digits = String::with_capacity(48);
    for chunk in bytes.chunks(5) {
        let n = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        for i in (0..8).rev() {
            digits.push(ALPHABET[((n >> (i * 5)) & 31) as usize] as char);
        }
    }
    digits
        .as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Loads the signing key from its Secret in the agent's namespace, or makes one and stores it
/// there (several replicas may race: the one whose create lands wins, the others read it).
pub async fn load_or_create_signer(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Signer, RegistryError> {
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    let from_secret = |secret: &Secret| {
        let data = secret.data.clone().unwrap_or_default();
        let field = |key: &str| {
            data.get(key)
                .and_then(|v| String::from_utf8(v.0.clone()).ok())
                .ok_or_else(|| RegistryError::Key(format!("Secret {namespace}/{name} has no {key}")))
        };
        Signer::from_pem(&field("tls.key")?, &field("tls.crt")?)
    };
    if let Some(existing) = secrets.get_opt(name).await? {
        return from_secret(&existing);
    }
    let (signer, key_pem) = Signer::generate()?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                super::MANAGED_BY_LABEL.to_string(),
                super::MANAGED_BY.to_string(),
            )])),
            annotations: Some(BTreeMap::from([(
                "apps.shapeblock.io/registry-token-key-id".to_string(),
                signer.key_id.clone(),
            )])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("tls.key".to_string(), ByteString(key_pem.into_bytes())),
            (
                "tls.crt".to_string(),
                ByteString(signer.cert_pem.clone().into_bytes()),
            ),
        ])),
        ..Default::default()
    };
    match secrets
        .create(
            &PostParams {
                field_manager: Some(super::FIELD_MANAGER.into()),
                ..Default::default()
            },
            &secret,
        )
        .await
    {
        Ok(_) => {
            tracing::info!(
                secret = %format!("{namespace}/{name}"),
                key_id = %signer.key_id,
                "made the registry token signing key; the registry's auth.token.rootcertbundle must list its certificate (tls.crt)"
            );
            Ok(signer)
        }
        Err(kube::Error::Api(status)) if status.code == 409 => from_secret(&secrets.get(name).await?),
        Err(err) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AppSpec, RegistrySpec};

    fn app(url: &str, secret: Option<&str>) -> App {
        let mut spec: AppSpec = serde_json::from_value(json!({
            "registry": {"url": url}, "build": {"type": "dockerfile"},
            "git": {"url": "https://github.com/example/web.git"},
        }))
        .unwrap();
        spec.registry = RegistrySpec {
            url: url.into(),
            secret_name: secret.map(Into::into),
        };
        let mut app = App::new("web", spec);
        app.metadata.namespace = Some("a".into());
        app
    }

    #[test]
    fn pods_pull_with_the_projects_copy_and_the_apps_own_credential() {
        let cluster = settings("registry.example.com");
        let shared = Some("registry-credentials");
        assert_eq!(
            pull_secrets(&app("registry.example.com", None), &cluster, shared),
            ["registry-credentials"]
        );
        assert_eq!(
            pull_secrets(&app("ghcr.io/acme", Some("ghcr")), &cluster, shared),
            ["registry-credentials", "ghcr"]
        );
        // Naming the project's copy is not a second entry; no copy configured, none listed.
        assert_eq!(
            pull_secrets(
                &app("registry.example.com", Some("registry-credentials")),
                &cluster,
                shared
            ),
            ["registry-credentials"]
        );
        assert_eq!(
            pull_secrets(&app("ghcr.io/acme", Some("ghcr")), &cluster, None),
            ["ghcr"]
        );
        assert!(pull_secrets(&app("registry.example.com", None), &cluster, None).is_empty());
        // A destination the agent refuses gives no credential of the tenant's choosing.
        assert_eq!(
            pull_secrets(&app("registry.example.com/other", Some("x")), &cluster, shared),
            ["registry-credentials"]
        );
    }

    fn settings(cluster: &str) -> RegistrySettings {
        RegistrySettings {
            cluster: Some(cluster.into()),
            ..Default::default()
        }
    }

    fn reason(result: Result<PushTarget, RegistryError>) -> &'static str {
        match result {
            Err(RegistryError::Refused { reason, .. }) => reason,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn the_cluster_registry_scopes_to_the_apps_own_repositories() {
        let target = push_target(
            &app("registry.example.com", None),
            &settings("registry.example.com"),
            None,
        );
        assert_eq!(
            target.unwrap(),
            PushTarget::Cluster {
                host: "registry.example.com".into(),
                repositories: ["a/web".into(), "a/web/cache".into()],
            }
        );
        // An operator's prefix (a shared registry's per-cluster namespace) comes first.
        let prefixed = push_target(
            &app("registry.shapeblock.io/c-42", None),
            &settings("registry.shapeblock.io/c-42"),
            None,
        );
        assert_eq!(
            prefixed.unwrap(),
            PushTarget::Cluster {
                host: "registry.shapeblock.io".into(),
                repositories: ["c-42/a/web".into(), "c-42/a/web/cache".into()],
            }
        );
        // Another spelling of the same host is not a way around it.
        for url in [
            "Registry.Example.com",
            "registry.example.com.",
            "registry.example.com:5000",
        ] {
            assert_eq!(
                reason(push_target(
                    &app(url, None),
                    &settings("registry.example.com"),
                    None
                )),
                "RegistryPathRefused",
                "{url}"
            );
        }
    }

    #[test]
    fn a_tenant_cannot_choose_a_path_port_or_credential_inside_the_cluster_registry() {
        let cluster = settings("registry.example.com:5000");
        for url in [
            "registry.example.com:5000/other-project",
            "registry.example.com:5000/a/web",
            "registry.example.com",
            "registry.example.com:443",
            "REGISTRY.example.com:5000/b",
        ] {
            assert_eq!(
                reason(push_target(&app(url, None), &cluster, None)),
                "RegistryPathRefused",
                "{url}"
            );
            // Not even with a Secret of their own.
            assert_eq!(
                reason(push_target(&app(url, Some("mine")), &cluster, None)),
                "RegistryPathRefused",
                "{url}"
            );
        }
        assert_eq!(
            reason(push_target(
                &app("registry.example.com:5000", Some("mine")),
                &cluster,
                Some("pull")
            )),
            "RegistryCredentialRefused"
        );
        // The pull secret's name is what an App left out before: it means the same (a token).
        assert!(matches!(
            push_target(
                &app("registry.example.com:5000", Some("pull")),
                &cluster,
                Some("pull")
            ),
            Ok(PushTarget::Cluster { .. })
        ));
        // A prefix the operator chose is not the tenant's to leave.
        let prefixed = settings("registry.shapeblock.io/c-42");
        assert_eq!(
            reason(push_target(
                &app("registry.shapeblock.io/c-43", None),
                &prefixed,
                None
            )),
            "RegistryPathRefused"
        );
        assert_eq!(
            reason(push_target(&app("registry.shapeblock.io", None), &prefixed, None)),
            "RegistryPathRefused"
        );
    }

    #[test]
    fn another_registry_needs_the_tenants_own_secret() {
        let cluster = settings("registry.example.com");
        assert_eq!(
            reason(push_target(&app("ghcr.io/acme", None), &cluster, None)),
            "RegistryCredentialsMissing"
        );
        assert_eq!(
            push_target(&app("ghcr.io/acme", Some("ghcr")), &cluster, None).unwrap(),
            PushTarget::Own {
                secret: "ghcr".into(),
                host: "ghcr.io".into()
            }
        );
        // Without a cluster registry, every App names its own.
        assert_eq!(
            reason(push_target(
                &app("registry.example.com", None),
                &RegistrySettings::default(),
                None
            )),
            "RegistryCredentialsMissing"
        );
    }

    #[test]
    fn the_shared_mode_is_explicit_and_needs_its_secret() {
        let shared = RegistrySettings {
            push_mode: PushMode::Shared,
            ..settings("registry.example.com")
        };
        assert_eq!(
            push_target(
                &app("registry.example.com", None),
                &shared,
                Some("registry-credentials")
            )
            .unwrap(),
            PushTarget::Shared {
                secret: "registry-credentials".into()
            }
        );
        assert_eq!(
            reason(push_target(&app("registry.example.com", None), &shared, None)),
            "RegistryCredentialsMissing"
        );
        assert_eq!(
            reason(push_target(
                &app("registry.example.com/b", None),
                &shared,
                Some("x")
            )),
            "RegistryPathRefused"
        );
    }

    fn secret(type_: &str, label: Option<&str>, host: Option<&str>) -> Secret {
        let mut secret = Secret {
            type_: Some(type_.into()),
            ..Default::default()
        };
        if let Some(label) = label {
            secret.labels_mut().insert(CREDENTIAL_LABEL.into(), label.into());
        }
        if let Some(host) = host {
            secret
                .annotations_mut()
                .insert(REGISTRY_HOST_ANNOTATION.into(), host.into());
        }
        secret
    }

    #[test]
    fn only_a_secret_made_as_a_credential_for_that_host_is_used() {
        let good = secret(DOCKER_CONFIG_TYPE, Some("registry"), Some("ghcr.io"));
        assert!(check_own_credential(Some(&good), "ghcr", "ghcr.io").is_ok());
        assert!(check_own_credential(Some(&good), "ghcr", "GHCR.io").is_ok());
        let refused = |s: Option<&Secret>, host: &str| match check_own_credential(s, "x", host) {
            Err(RegistryError::Refused { reason, message }) => (reason, message),
            other => panic!("accepted: {other:?}"),
        };
        assert_eq!(refused(None, "ghcr.io").0, "RegistrySecretNotFound");
        let cases = [
            (
                secret("Opaque", Some("registry"), Some("ghcr.io")),
                "type is Opaque",
            ),
            (secret(DOCKER_CONFIG_TYPE, None, Some("ghcr.io")), "no label"),
            (
                secret(DOCKER_CONFIG_TYPE, Some("git"), Some("ghcr.io")),
                "no label",
            ),
            (
                secret(DOCKER_CONFIG_TYPE, Some("registry"), None),
                "no annotation",
            ),
            (
                secret(DOCKER_CONFIG_TYPE, Some("registry"), Some("evil.example")),
                "marked for registry evil.example",
            ),
        ];
        for (case, why) in cases {
            let (reason, message) = refused(Some(&case), "ghcr.io");
            assert_eq!(reason, "RegistrySecretRefused");
            assert!(message.contains(why), "{message}");
        }
    }

    #[test]
    fn tokens_are_es256_jws_with_a_libtrust_key_id_and_exact_access() {
        let (signer, key_pem) = Signer::generate().unwrap();
        // Reloading gives the same key id; a certificate of another key is refused.
        assert_eq!(
            Signer::from_pem(&key_pem, &signer.cert_pem).unwrap().key_id,
            signer.key_id
        );
        let (other, _) = Signer::generate().unwrap();
        assert!(Signer::from_pem(&key_pem, &other.cert_pem).is_err());
        assert_eq!(signer.key_id.len(), 12 * 4 + 11);
        assert!(signer.key_id.split(':').all(|g| g.len() == 4));
        let repos = ["a/web".to_string(), "a/web/cache".to_string()];
        let token = signer.mint("iss", "svc", "a/web-1", &repos, 300).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let decode = |p: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .unwrap()
        };
        let header: serde_json::Value = serde_json::from_slice(&decode(parts[0])).unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"], signer.key_id.as_str());
        let claims: serde_json::Value = serde_json::from_slice(&decode(parts[1])).unwrap();
        assert_eq!(
            (claims["iss"].as_str(), claims["aud"].as_str()),
            (Some("iss"), Some("svc"))
        );
        assert_eq!(
            claims["access"],
            json!([
                {"type": "repository", "name": "a/web", "actions": ["pull", "push"]},
                {"type": "repository", "name": "a/web/cache", "actions": ["pull", "push"]},
            ])
        );
        assert_eq!(
            claims["exp"].as_i64().unwrap() - claims["nbf"].as_i64().unwrap(),
            300
        );
        // The signature verifies with the certificate's public key.
        let cert_der = rustls::pki_types::CertificateDer::from_pem_slice(signer.cert_pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&cert_der).unwrap();
        let point = cert.public_key().subject_public_key.data.to_vec();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point)
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &decode(parts[2]))
            .unwrap();
    }

    #[test]
    fn push_secrets_carry_only_a_registry_token() {
        use kube::Resource;
        let mut build = crate::api::AppBuild::new(
            "web-1",
            serde_json::from_value(json!({"appName": "web"})).unwrap(),
        );
        build.metadata.uid = Some("uid".into());
        let owner = build.controller_owner_ref(&()).unwrap();
        let secret = push_secret(
            "a",
            "web-1-push",
            BTreeMap::new(),
            &owner,
            "registry.example.com",
            "jwt",
        );
        assert_eq!(secret.type_.as_deref(), Some(DOCKER_CONFIG_TYPE));
        let config: serde_json::Value =
            serde_json::from_slice(&secret.data.unwrap()[".dockerconfigjson"].0).unwrap();
        assert_eq!(
            config,
            json!({"auths": {"registry.example.com": {"registrytoken": "jwt"}}})
        );
        assert_eq!(secret.metadata.owner_references.unwrap()[0].kind, "AppBuild");
    }
}
