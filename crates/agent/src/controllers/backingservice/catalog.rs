//! The BackingService catalog: data, not code. The built-in entries are compiled in from
//! `catalog.yaml`; a cluster admin overrides or adds entries with a ConfigMap in the agent's
//! namespace, so a new service type needs no new agent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The built-in catalog.
pub const BUILTIN: &str = include_str!("catalog.yaml");
pub use crate::names::CATALOG_CONFIGMAP as CONFIGMAP;
/// Key of the ConfigMap holding the catalog YAML.
pub const CONFIGMAP_KEY: &str = "catalog.yaml";

/// User `helmValues` keys the agent knows how to translate. A catalog entry allows a subset.
pub const VALUE_KEYS: &[&str] = &["env", "args", "storageClassName", "nodeSelector"];

/// Keys of the generated credentials Secret that `credentialEnv` may point at.
pub const CREDENTIAL_KEYS: &[&str] = &["username", "password", "root-password", "database"];

const PLACEHOLDERS: &[&str] = &["username", "password", "host", "port", "database"];

/// Types to entries, in a stable order.
pub type Catalog = BTreeMap<String, Entry>;

/// One service type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Entry {
    /// Shown to users.
    pub description: String,
    /// Image repository without tag; the version is the tag.
    pub image: String,
    pub default_version: String,
    /// Versions users may ask for; empty means any tag.
    #[serde(default)]
    pub versions: Vec<String>,
    /// The service's TCP port.
    pub port: u16,
    /// User name put in the credentials Secret.
    pub username: String,
    /// Database (or vhost, or index) put in the credentials Secret.
    pub database: String,
    /// Connection URI template for consumers.
    pub uri: String,
    /// Extra variable bound apps get with the URI (e.g. `DATABASE_URL`), when unambiguous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding_alias: Option<String>,
    /// Where the data volume is mounted.
    pub data_path: String,
    /// Container variable → key of the credentials Secret.
    pub credential_env: BTreeMap<String, String>,
    /// Fixed, non-secret container variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Container arguments (before the user's).
    #[serde(default)]
    pub args: Vec<String>,
    /// Container variables users may not set, besides those of `credentialEnv` (and their
    /// `_FILE` forms) and `env`: the engine's switches for authentication, users and data.
    /// Required, so that an admin's entry says it too (an empty list is a statement).
    pub reserved_env: Vec<String>,
    /// Argument flags users may not pass (`--flag` or `-f`), besides the flags of `args`.
    /// Required; an entry that allows `args` must list at least one.
    pub reserved_args: Vec<String>,
    /// Modifiers the engine accepts in front of a flag name (mysqld's `loose-`, `skip-`):
    /// stripped before a user flag is compared with the reserved ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flag_prefixes: Vec<String>,
    /// Short flags whose value is `name=value` of a setting that also has a `--name` form
    /// (postgres' `-c`): the setting's name is checked like a long flag.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub setting_flags: Vec<String>,
    /// Variables whose value is more arguments (postgres' POSTGRES_INITDB_ARGS): checked like
    /// `args`, and limited to plain words (the entrypoint evaluates it in a shell).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arg_env: Vec<String>,
    /// Plan defaults.
    pub defaults: Defaults,
    /// Which of [`VALUE_KEYS`] users may set in `helmValues`.
    #[serde(default)]
    pub allowed_values: Vec<String>,
}

/// Storage, CPU and memory used when the plan does not say.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    pub storage: String,
    pub cpu: String,
    pub memory: String,
}

/// Parses catalog YAML and checks every entry.
pub fn parse(yaml: &str) -> Result<Catalog, String> {
    let catalog: Catalog = serde_yaml::from_str(yaml).map_err(|e| e.to_string())?;
    for (name, entry) in &catalog {
        validate(name, entry).map_err(|e| format!("entry {name}: {e}"))?;
    }
    Ok(catalog)
}

/// The built-in catalog with the admin's entries (if any) replacing or adding types.
pub fn merged(overrides: Option<&str>) -> Result<Catalog, String> {
    let mut catalog = parse(BUILTIN).expect("the built-in catalog is valid (unit-tested)");
    if let Some(yaml) = overrides {
        let extra = parse(yaml).map_err(|e| format!("ConfigMap {CONFIGMAP}: {e}"))?;
        catalog.extend(extra);
    }
    Ok(catalog)
}

fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

fn validate(name: &str, entry: &Entry) -> Result<(), String> {
    let dns_label = |s: &str| {
        !s.is_empty()
            && s.len() <= 20
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    if !dns_label(name) {
        return Err("type must be a DNS label of at most 20 characters".into());
    }
    // Everything below ends up in chart values, which the chart renders through `tpl`.
    let mut texts: Vec<&str> = vec![
        &entry.image,
        &entry.default_version,
        &entry.username,
        &entry.database,
        &entry.uri,
        &entry.data_path,
    ];
    texts.extend(entry.versions.iter().map(String::as_str));
    texts.extend(entry.env.values().map(String::as_str));
    texts.extend(entry.args.iter().map(String::as_str));
    if texts.iter().any(|t| t.contains("{{")) {
        return Err("templates ('{{') are not allowed".into());
    }
    let tag_ok = |t: &str| {
        !t.is_empty() && t.len() <= 128 && t.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    };
    if !tag_ok(&entry.default_version) || !entry.versions.iter().all(|v| tag_ok(v)) {
        return Err("versions must be image tags".into());
    }
    if !entry.versions.is_empty() && !entry.versions.contains(&entry.default_version) {
        return Err(format!(
            "defaultVersion {} is not in versions",
            entry.default_version
        ));
    }
    // The URI is built without escaping: keep what goes into it URI-safe.
    let uri_safe = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if entry.username.is_empty() || !uri_safe(&entry.username) || !uri_safe(&entry.database) {
        return Err("username and database may use letters, digits, '.', '_' and '-' only".into());
    }
    if entry.port == 0 {
        return Err("port must be 1-65535".into());
    }
    if !entry.data_path.starts_with('/') {
        return Err("dataPath must be absolute".into());
    }
    let mut rest = entry.uri.as_str();
    while let Some(start) = rest.find('{') {
        let end = rest[start..].find('}').ok_or("uri has an unclosed '{'")?;
        let placeholder = &rest[start + 1..start + end];
        if !PLACEHOLDERS.contains(&placeholder) {
            return Err(format!(
                "uri placeholder {{{placeholder}}} is unknown: use {}",
                PLACEHOLDERS.join(", ")
            ));
        }
        rest = &rest[start + end + 1..];
    }
    for (variable, key) in &entry.credential_env {
        if !is_env_name(variable) {
            return Err(format!("credentialEnv {variable} is not a variable name"));
        }
        if !CREDENTIAL_KEYS.contains(&key.as_str()) {
            return Err(format!(
                "credentialEnv {variable}: key {key} is not one of {}",
                CREDENTIAL_KEYS.join(", ")
            ));
        }
    }
    if !entry.credential_env.values().any(|k| k == "password") {
        return Err("credentialEnv must pass the password to the service".into());
    }
    if let Some(variable) = entry.env.keys().find(|v| !is_env_name(v)) {
        return Err(format!("env {variable} is not a variable name"));
    }
    if let Some(variable) = entry
        .reserved_env
        .iter()
        .chain(&entry.arg_env)
        .find(|v| !is_env_name(v))
    {
        return Err(format!(
            "{variable} (reservedEnv or argEnv) is not a variable name"
        ));
    }
    if let Some(variable) = entry
        .arg_env
        .iter()
        .find(|v| entry.reserved_env_reason(v).is_some())
    {
        return Err(format!("argEnv {variable} is reserved: users cannot set it"));
    }
    let flag_name =
        |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c));
    let short = |f: &str| f.len() == 2 && f.starts_with('-') && f.as_bytes()[1].is_ascii_alphanumeric();
    if let Some(flag) = entry
        .reserved_args
        .iter()
        .find(|f| !(short(f) || f.strip_prefix("--").is_some_and(flag_name)))
    {
        return Err(format!("reservedArgs {flag:?} is not a flag (--name or -x)"));
    }
    if let Some(flag) = entry.setting_flags.iter().find(|f| !short(f)) {
        return Err(format!("settingFlags {flag:?} is not a short flag (-x)"));
    }
    if let Some(prefix) = entry
        .flag_prefixes
        .iter()
        .find(|p| !p.ends_with('-') || p.len() < 2 || !p.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
    {
        return Err(format!(
            "flagPrefixes {prefix:?} must be lowercase and end with '-'"
        ));
    }
    if entry.allowed_values.iter().any(|k| k == "args") && entry.reserved_args.is_empty() {
        return Err(
            "allowedValues has args, so reservedArgs must list the flags that control \
                    authentication and data: an engine whose flags nobody reviewed takes no arguments"
                .into(),
        );
    }
    if let Some(alias) = entry.binding_alias.as_deref().filter(|a| !is_env_name(a)) {
        return Err(format!("bindingAlias {alias} is not a variable name"));
    }
    if let Some(key) = entry
        .allowed_values
        .iter()
        .find(|k| !VALUE_KEYS.contains(&k.as_str()))
    {
        return Err(format!(
            "allowedValues: {key} is not one the agent translates ({})",
            VALUE_KEYS.join(", ")
        ));
    }
    for quantity in [
        &entry.defaults.storage,
        &entry.defaults.cpu,
        &entry.defaults.memory,
    ] {
        if quantity.is_empty() || !quantity.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') {
            return Err(format!("defaults: {quantity:?} is not a quantity"));
        }
    }
    Ok(())
}

impl Entry {
    /// The image tag for a requested version, or why it is refused.
    pub fn version<'a>(&'a self, requested: Option<&'a str>) -> Result<&'a str, String> {
        let version = requested.unwrap_or(&self.default_version);
        if self.versions.is_empty() || self.versions.iter().any(|v| v == version) {
            Ok(version)
        } else {
            Err(format!(
                "version {version} is not offered: choose one of {}",
                self.versions.join(", ")
            ))
        }
    }

    /// Why users may not set container variable `name`, if they may not.
    pub fn reserved_env_reason(&self, name: &str) -> Option<&'static str> {
        let credential = |n: &str| self.credential_env.contains_key(n);
        if credential(name) || name.strip_suffix("_FILE").is_some_and(credential) {
            Some("is set by the agent from the generated credentials")
        } else if self.env.contains_key(name) {
            Some("is set by the catalog entry")
        } else if self.reserved_env.iter().any(|r| r == name) {
            Some("is reserved by the catalog entry (authentication, users or data)")
        } else {
            None
        }
    }

    /// Checks a user's `env` variable: not reserved, and plain words for an argument variable.
    pub fn check_env(&self, name: &str, value: &str) -> Result<(), String> {
        if let Some(why) = self.reserved_env_reason(name) {
            return Err(format!(
                "env {name} {why}; it cannot be overridden for type {}",
                self.image
            ));
        }
        if self.arg_env.iter().any(|v| v == name) {
            // The entrypoint evaluates it in a shell: only words, so that nothing runs.
            if let Some(c) = value
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || " -_=.,:/+@%".contains(*c)))
            {
                return Err(format!(
                    "env {name} is passed through a shell: {c:?} is not allowed (letters, digits, \
                     spaces and -_=.,:/+@% are)"
                ));
            }
            let words: Vec<String> = value.split_whitespace().map(str::to_owned).collect();
            self.check_flags(&words)
                .map_err(|why| format!("env {name}: {why}"))?;
        }
        Ok(())
    }

    /// Checks a user's `args`: no reserved flag in any spelling the engine reads, no line
    /// breaks, and (when the entry has no arguments of its own) a flag first: the official
    /// images run a first argument that is not a flag as the container's command.
    pub fn check_args(&self, args: &[String]) -> Result<(), String> {
        if self.args.is_empty()
            && let Some(first) = args.first()
            && !first.starts_with('-')
        {
            return Err(format!(
                "args must start with a flag: the image runs {first:?} as its command instead of the service"
            ));
        }
        self.check_flags(args).map_err(|why| format!("args: {why}"))
    }

    /// A flag name as compared: lowercase, `_` as `-`, without the entry's modifiers.
    fn normalized(&self, name: &str) -> String {
        let mut name = name.to_ascii_lowercase().replace('_', "-");
        while let Some(prefix) = self.flag_prefixes.iter().find(|p| name.starts_with(p.as_str())) {
            name.drain(..prefix.len());
        }
        name
    }

    /// The agent's flags: the reserved ones and those of `args`, as (shown, compared).
    fn agent_flags(&self) -> (Vec<(String, String)>, Vec<char>) {
        let mut long = Vec::new();
        let mut short = Vec::new();
        for flag in self.reserved_args.iter().chain(&self.args) {
            if let Some(name) = flag.strip_prefix("--") {
                let name = name.split(['=', ' ', '\t']).next().unwrap_or_default();
                long.push((format!("--{name}"), self.normalized(name)));
            } else if flag.len() == 2 && flag.starts_with('-') {
                short.push(flag.as_bytes()[1] as char);
            }
        }
        (long, short)
    }

    fn long_reserved(&self, long: &[(String, String)], name: &str) -> Option<String> {
        // A start of a modifier (`--sk` for `--skip-`): the server expands it to one of its
        // flags, reserved ones included.
        let spelled = name.to_ascii_lowercase().replace('_', "-");
        if let Some(modifier) = self
            .flag_prefixes
            .iter()
            .find(|p| !spelled.is_empty() && p.starts_with(&spelled) && **p != spelled)
        {
            return Some(format!("abbreviates the modifier --{modifier}"));
        }
        let name = self.normalized(name);
        long.iter().find_map(|(shown, reserved)| {
            if *reserved == name {
                Some(format!("sets {shown}"))
            } else if reserved.starts_with(&name) {
                Some(format!("abbreviates {shown}"))
            } else {
                None
            }
        })
    }

    fn check_flags(&self, args: &[String]) -> Result<(), String> {
        let (long, short) = self.agent_flags();
        let refuse = |arg: &str, why: String| {
            Err(format!(
                "argument {arg:?} {why}, which the agent decides for this service type \
                 (authentication, users and data are not the user's to change)"
            ))
        };
        let mut rest = args.iter();
        while let Some(arg) = rest.next() {
            if arg.chars().any(char::is_control) {
                return Err(format!(
                    "argument {arg:?} holds a line break or control character (a server may read it as a config line)"
                ));
            }
            if let Some(word) = arg.strip_prefix("--") {
                // `--name=value`, or `--name value` in one argument (a Redis config line).
                let name = word.split(['=', ' ', '\t']).next().unwrap_or_default();
                if let Some(why) = self.long_reserved(&long, name) {
                    return refuse(arg, why);
                }
            } else if let Some(word) = arg.strip_prefix('-') {
                let Some(letter) = word.chars().next() else {
                    return refuse(arg, "is a prefix of every flag".into());
                };
                if short.contains(&letter) {
                    return refuse(arg, format!("sets -{letter}"));
                }
                if self.setting_flags.iter().any(|s| s[1..].starts_with(letter)) {
                    // `-c name=value` or `-cname=value`.
                    let setting = if word.len() > 1 {
                        Some(&word[letter.len_utf8()..])
                    } else {
                        rest.next().map(String::as_str)
                    };
                    if let Some(setting) = setting {
                        if setting.chars().any(char::is_control) {
                            return refuse(setting, "holds a control character".into());
                        }
                        let name = setting.split('=').next().unwrap_or_default();
                        if let Some(why) = self.long_reserved(&long, name) {
                            return refuse(setting, why);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The consumers' URI, with every placeholder filled in.
    pub fn uri(&self, username: &str, password: &str, host: &str, database: &str) -> String {
        self.uri
            .replace("{username}", username)
            .replace("{password}", password)
            .replace("{host}", host)
            .replace("{port}", &self.port.to_string())
            .replace("{database}", database)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_catalog_has_the_five_types() {
        let catalog = parse(BUILTIN).unwrap();
        let types: Vec<&str> = catalog.keys().map(String::as_str).collect();
        assert_eq!(types, ["mongodb", "mysql", "postgresql", "rabbitmq", "redis"]);
        for entry in catalog.values() {
            assert!(entry.image.starts_with("docker.io/library/"), "{}", entry.image);
        }
    }

    #[test]
    fn overrides_replace_and_add_entries() {
        let added = include_str!("../../../../../tests/fixtures/catalog-keyvalue.yaml");
        let mut redis = parse(BUILTIN).unwrap()["redis"].clone();
        redis.image = "docker.io/valkey/valkey".into();
        redis.versions.clear();
        redis.default_version = "8.1".into();
        let replaced = serde_yaml::to_string(&BTreeMap::from([("redis", redis)])).unwrap();
        let catalog = merged(Some(&format!("{added}\n{replaced}"))).unwrap();
        assert_eq!(catalog["redis"].image, "docker.io/valkey/valkey");
        assert_eq!(catalog["keyvalue"].port, 6379);
        assert!(catalog.contains_key("postgresql"), "other built-ins stay");
        assert_eq!(catalog["redis"].version(None).unwrap(), "8.1");
        assert_eq!(
            catalog["redis"].version(Some("9")).unwrap(),
            "9",
            "no list: any tag"
        );
    }

    #[test]
    fn bad_entries_are_refused_with_a_reason() {
        let base = parse(BUILTIN).unwrap()["postgresql"].clone();
        let check = |change: &dyn Fn(&mut Entry), why: &str| {
            let mut entry = base.clone();
            change(&mut entry);
            let yaml = serde_yaml::to_string(&BTreeMap::from([("pg", entry)])).unwrap();
            let err = parse(&yaml).unwrap_err();
            assert!(err.contains(why), "{err}");
        };
        check(&|e| e.uri = "pg://{secret}@{host}".into(), "placeholder {secret}");
        check(&|e| e.image = "{{ .Values.x }}".into(), "templates");
        check(&|e| e.default_version = "9".into(), "not in versions");
        check(
            &|e| e.allowed_values = vec!["extraDeploy".into()],
            "allowedValues",
        );
        check(
            &|e| {
                e.credential_env.insert("X".into(), "token".into());
            },
            "key token",
        );
        check(&|e| e.credential_env.clear(), "must pass the password");
        check(&|e| e.username = "a:b".into(), "username and database");
        assert!(
            parse("postgresql: {image: x}")
                .unwrap_err()
                .contains("missing field")
        );
        assert!(merged(Some("x: [")).unwrap_err().contains(CONFIGMAP));
    }

    #[test]
    fn versions_and_uris() {
        let catalog = parse(BUILTIN).unwrap();
        let pg = &catalog["postgresql"];
        assert_eq!(pg.version(None).unwrap(), "17");
        assert!(pg.version(Some("9.6")).unwrap_err().contains("14, 15, 16, 17"));
        assert_eq!(
            pg.uri("app", "pw", "db-postgresql.shop.svc", "app"),
            "postgresql://app:pw@db-postgresql.shop.svc:5432/app"
        );
    }
}
