//! Clone credentials for an App: the Secret it names, checked against its URL, or an SSH deploy
//! key the agent generates once into a Secret the App owns (regenerated on request).

use super::*;

/// The outcome of credential handling, for status.
pub(super) struct Credentials {
    pub(super) secret_name: Option<String>,
    pub(super) public_key: Option<String>,
    /// For SSH sources: whether the clone can check the server's host key.
    pub(super) host_keys_known: bool,
}

impl Credentials {
    pub(super) fn none() -> Self {
        Self {
            secret_name: None,
            public_key: None,
            host_keys_known: true,
        }
    }
}

/// Finds or makes the clone credentials.
pub(super) async fn ensure_credentials(app: &App, ctx: &Context) -> Result<Credentials> {
    let Some(git) = &app.spec.git else {
        return Ok(Credentials::none());
    };
    let namespace = app.namespace().unwrap_or_default();
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &namespace);
    if let Some(name) = &git.secret_name {
        let Some(secret) = secrets.get_opt(name).await? else {
            return Err(Error::InvalidSpec {
                reason: "SecretNotFound",
                message: format!("git.secretName {name} does not exist in namespace {namespace}"),
            });
        };
        check_credentials_secret(&secret, &git.url)?;
        return Ok(Credentials {
            secret_name: Some(name.clone()),
            public_key: None,
            host_keys_known: true,
        });
    }
    if !git.is_private {
        return Ok(Credentials::none());
    }
    let known_hosts = known_hosts(ctx).await?;
    let wanted = app
        .annotations()
        .get(REGENERATE_KEY_ANNOTATION)
        .cloned()
        .unwrap_or_default();
    let name = deploy_key_name(app);
    if let Some(existing) = secrets.get_opt(&name).await? {
        if !is_own_deploy_key(&existing, app) {
            return Err(Error::InvalidSpec {
                reason: "DeployKeyConflict",
                message: format!(
                    "Secret {name} exists but is not the deploy key the agent generated for this App (no {DEPLOY_KEY_LABEL} label, or owned by something else): it is not used; delete or rename it, or name a git credentials Secret as git.secretName"
                ),
            });
        }
        let made_for = existing
            .annotations()
            .get(GENERATED_FOR_ANNOTATION)
            .cloned()
            .unwrap_or_default();
        if made_for == wanted {
            let data = existing.data.clone().unwrap_or_default();
            let public = data
                .get(PUBLIC_KEY)
                .map(|b| String::from_utf8_lossy(&b.0).trim().to_string());
            // Host keys follow the ConfigMap (added, rotated or removed by the admin).
            if data.get(KNOWN_HOSTS).map(|b| b.0.as_slice()) != known_hosts.as_deref().map(str::as_bytes) {
                let value = known_hosts.as_deref().map(|k| ByteString(k.as_bytes().to_vec()));
                secrets
                    .patch(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"data": {KNOWN_HOSTS: value}})),
                    )
                    .await?;
            }
            return Ok(Credentials {
                secret_name: Some(name),
                public_key: public,
                host_keys_known: known_hosts.is_some(),
            });
        }
        let key = generate_deploy_key(&comment(app))?;
        let secret = desired_deploy_key(
            app,
            &name,
            &key,
            known_hosts.as_deref(),
            &wanted,
            &owner_reference(app),
        );
        secrets
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await?;
        ctx.publish(
            &app.object_ref(&()),
            EventType::Normal,
            "DeployKeyRegenerated",
            "Credentials",
            format!("replaced the SSH deploy key in Secret {name}: add the new public key (status.sshPublicKey) to the repository"),
        )
        .await;
        return Ok(Credentials {
            secret_name: Some(name),
            public_key: Some(key.public),
            host_keys_known: known_hosts.is_some(),
        });
    }
    let key = generate_deploy_key(&comment(app))?;
    let secret = desired_deploy_key(
        app,
        &name,
        &key,
        known_hosts.as_deref(),
        &wanted,
        &owner_reference(app),
    );
    // Create, never overwrite: a concurrent reconcile that won the race keeps its key.
    match secrets
        .create(
            &PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            &secret,
        )
        .await
    {
        Ok(_) => {
            ctx.publish(
                &app.object_ref(&()),
                EventType::Normal,
                "DeployKeyGenerated",
                "Credentials",
                format!("generated an SSH deploy key in Secret {name}: add status.sshPublicKey to the repository as a read-only deploy key"),
            )
            .await;
            Ok(Credentials {
                secret_name: Some(name),
                public_key: Some(key.public),
                host_keys_known: known_hosts.is_some(),
            })
        }
        Err(kube::Error::Api(status)) if status.code == 409 => Err(Error::Waiting(format!(
            "deploy key Secret {name} was created concurrently; reading it again"
        ))),
        Err(err) => Err(err.into()),
    }
}

pub(super) fn comment(app: &App) -> String {
    format!(
        "shapeblock:{}/{}",
        app.namespace().unwrap_or_default(),
        app.name_any()
    )
}

/// Name of the generated deploy-key Secret (App names are at most 40 characters).
pub fn deploy_key_name(app: &App) -> String {
    format!("{}-deploy-key", app.name_any())
}

/// The SSH `known_hosts` the cluster admin provides, if any.
pub(super) async fn known_hosts(ctx: &Context) -> Result<Option<String>> {
    let configmaps = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ctx.config.agent_namespace);
    let found = configmaps.get_opt(KNOWN_HOSTS_CONFIGMAP).await?;
    Ok(found
        .and_then(|c| c.data)
        .and_then(|mut d| d.remove(KNOWN_HOSTS))
        .filter(|k| !k.trim().is_empty()))
}

/// The Secret holding a generated deploy key (`kubernetes.io/ssh-auth`).
pub(super) fn desired_deploy_key(
    app: &App,
    name: &str,
    key: &DeployKey,
    known_hosts: Option<&str>,
    made_for: &str,
    owner: &OwnerReference,
) -> Secret {
    let mut data = BTreeMap::from([
        (
            SSH_PRIVATE_KEY.to_string(),
            ByteString(key.private.as_bytes().to_vec()),
        ),
        (PUBLIC_KEY.to_string(), ByteString(key.public.as_bytes().to_vec())),
    ]);
    if let Some(known_hosts) = known_hosts {
        data.insert(
            KNOWN_HOSTS.to_string(),
            ByteString(known_hosts.as_bytes().to_vec()),
        );
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: app.namespace(),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
                (APP_LABEL.to_string(), app.name_any()),
                (DEPLOY_KEY_LABEL.to_string(), "true".to_string()),
            ])),
            annotations: Some(BTreeMap::from([(
                GENERATED_FOR_ANNOTATION.to_string(),
                made_for.to_string(),
            )])),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        type_: Some("kubernetes.io/ssh-auth".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// A named credentials Secret must be one made for clones from this App's host, by someone
/// who may write Secrets: the credential label, the type that fits the URL, and the URL's host
/// among the hosts it was made for. Then it must hold what the clone needs: an SSH key and the
/// server's host keys for SSH URLs, a username and password (token) for HTTPS URLs. Every
/// missing mark is named at once, so one look at the Event says what to fix.
pub fn check_credentials_secret(secret: &Secret, url: &str) -> Result<()> {
    let name = secret.name_any();
    let endpoint = git_endpoint(url).map_err(|message| Error::InvalidSpec {
        reason: "InvalidSpec",
        message,
    })?;
    let host = endpoint.host.canonical();
    let (wanted_type, kind) = if endpoint.ssh {
        (SSH_AUTH_TYPE, "an SSH")
    } else {
        (BASIC_AUTH_TYPE, "an https")
    };
    let mut missing = Vec::new();
    if secret.labels().get(CREDENTIAL_LABEL).map(String::as_str) != Some(GIT_CREDENTIAL) {
        missing.push(format!("the label {CREDENTIAL_LABEL}={GIT_CREDENTIAL}"));
    }
    let actual_type = secret.type_.as_deref().unwrap_or("Opaque");
    if actual_type != wanted_type {
        missing.push(format!("type {wanted_type} for {kind} URL (it is {actual_type})"));
    }
    let made_for = secret
        .annotations()
        .get(GIT_HOSTS_ANNOTATION)
        .map(String::as_str)
        .unwrap_or_default();
    let bound = made_for
        .split([',', ' ', '\n'])
        .filter(|h| !h.is_empty())
        .filter_map(|h| git_host::parse(h).ok())
        .any(|h| h.canonical() == host);
    if !bound {
        missing.push(if made_for.trim().is_empty() {
            format!("the annotation {GIT_HOSTS_ANNOTATION} naming the git host(s) it is for ({host})")
        } else {
            format!("{host} in its annotation {GIT_HOSTS_ANNOTATION} (it is for {made_for:?})")
        });
    }
    if !missing.is_empty() {
        // Two reasons: "not made for clones at all" and "made for another host" are told apart
        // at a glance (and are two Events, not one Event's count).
        let reason = if bound || missing.len() > 1 {
            "CredentialsNotAllowed"
        } else {
            "CredentialsNotForHost"
        };
        return Err(Error::InvalidSpec {
            reason,
            message: format!(
                "Secret {name} is not a git credentials Secret for {host}: it lacks {}. Only someone who may write Secrets can mark one (e.g. `kubectl label secret {name} {CREDENTIAL_LABEL}={GIT_CREDENTIAL}` and `kubectl annotate secret {name} {GIT_HOSTS_ANNOTATION}={host}`); nothing of it is used until then",
                missing.join("; ")
            ),
        });
    }
    let has = |key: &str| secret.data.as_ref().is_some_and(|d| d.contains_key(key));
    if endpoint.ssh && has(SSH_PRIVATE_KEY) && !has(KNOWN_HOSTS) {
        return Err(Error::InvalidSpec {
            reason: "KnownHostsMissing",
            message: format!(
                "Secret {name} has no known_hosts: SSH clones check the git server's host key and never trust it blindly; add its keys (e.g. from `ssh-keyscan HOST`, checked against the host's published fingerprints) as known_hosts"
            ),
        });
    }
    let ok = if endpoint.ssh {
        has(SSH_PRIVATE_KEY)
    } else {
        has("username") && has("password")
    };
    if ok {
        Ok(())
    } else if endpoint.ssh {
        Err(Error::InvalidSpec {
            reason: "InvalidCredentials",
            message: format!("Secret {name} has no ssh-privatekey, which an SSH git URL needs"),
        })
    } else {
        Err(Error::InvalidSpec {
            reason: "InvalidCredentials",
            message: format!(
                "Secret {name} needs username and password (an access token) for an https git URL"
            ),
        })
    }
}

/// Whether an existing `<app>-deploy-key` Secret is the one the agent generated for this App
/// (not a Secret someone else made under that name, nor the key of an earlier App of the
/// same name that garbage collection has not removed yet).
pub(super) fn is_own_deploy_key(secret: &Secret, app: &App) -> bool {
    let owned = secret
        .owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && Some(&o.uid) == app.metadata.uid.as_ref());
    owned && secret.labels().contains_key(DEPLOY_KEY_LABEL)
}

/// A generated Ed25519 key pair in OpenSSH encodings.
pub struct DeployKey {
    /// `-----BEGIN OPENSSH PRIVATE KEY-----…`: stays in the Secret; never logged.
    pub private: String,
    /// `ssh-ed25519 AAAA… comment`: safe to show.
    pub public: String,
}

impl std::fmt::Debug for DeployKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeployKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// Generates an Ed25519 deploy key from the operating system's random source.
pub fn generate_deploy_key(comment: &str) -> Result<DeployKey> {
    use ring::rand::SecureRandom;
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| Error::Crypto("the system random source failed".into()))?;
    let keypair = ssh_key::private::Ed25519Keypair::from_seed(&seed);
    let mut private = ssh_key::PrivateKey::from(keypair);
    private.set_comment(comment);
    let public = private
        .public_key()
        .to_openssh()
        .map_err(|e| Error::Crypto(e.to_string()))?;
    let private = private
        .to_openssh(ssh_key::LineEnding::LF)
        .map_err(|e| Error::Crypto(e.to_string()))?;
    Ok(DeployKey {
        private: private.to_string(),
        public,
    })
}
