//! `scoped-secrets resolve`: the effective values of a project / environment / service and
//! where each comes from — the operator's own resolution, run from the command line.

use clap::{Args, ValueEnum};
use futures::future::try_join_all;
use serde::{Deserialize, Serialize};

use super::{CliError, ScopeArgs, VaultArgs, check_key};
use crate::api::v1alpha1::ScopedSecret;
use crate::resolve::{Entry, Resolved, ScopeData, resolve};
use crate::scope::{Coordinates, Layout};
use crate::template;
use crate::vault::kv::Kv;

/// Output formats.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// `KEY  VALUE  SOURCE`.
    Table,
    /// A JSON list of {key, value, scope, path, version}.
    Json,
    /// The same list as YAML.
    Yaml,
    /// `KEY='value'` lines that `sh` reads back unchanged (`set -a; . ./.env`); prints values.
    Env,
}

#[derive(Args, Debug)]
// With -f the scope flags are optional; when one is given, -p is too.
#[command(mut_arg("project", |a| a.required(false).required_unless_present("file")))]
pub struct ResolveArgs {
    /// The project / environment / service (optional with -f, where they stand in for the
    /// namespace's labels).
    #[command(flatten)]
    pub scope: Option<ScopeArgs>,
    /// A ScopedSecret manifest (`-` for stdin): resolve what the operator would write for it —
    /// its scopes, key selection and templates (ConfigMaps its templateFrom names are read
    /// from the same file). Rotation windows are not applied.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<std::path::PathBuf>,
    /// Show values (masked by default; `-o env` always shows them).
    #[arg(long)]
    pub show_values: bool,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// With `-o env`: keys without values, for an `.env.example`.
    #[arg(long)]
    pub keys_only: bool,
    /// Show every scope that sets KEY and which one wins.
    #[arg(long, value_name = "KEY")]
    pub explain: Option<String>,
}

/// One resolved key as JSON/YAML print it (SPEC §6).
#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct Row {
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    pub scope: String,
    pub path: String,
    pub version: u64,
    /// For a templated key (`scope: template`): the resolved keys it was built from.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
}

/// Rows of a resolution; values only when `show`.
pub fn rows(resolved: &Resolved, show: bool) -> Vec<Row> {
    resolved
        .iter()
        .map(|(k, r)| Row {
            key: k.clone(),
            value: show.then(|| r.value.expose().to_string()),
            scope: r.source.scope.as_str().to_string(),
            path: r.source.path.clone(),
            version: r.source.version,
            inputs: Vec::new(),
        })
        .collect()
}

/// Rows of the keys templates write, after the resolved keys written as they are, by name.
pub fn output_rows(output: &template::Output, show: bool) -> Vec<Row> {
    let mut out = rows(&output.resolved, show);
    out.extend(output.templated.iter().map(|(k, t)| Row {
        key: k.clone(),
        value: show.then(|| t.value.expose().to_string()),
        scope: "template".into(),
        path: t.origin.path(),
        version: 0,
        inputs: t.inputs.keys().cloned().collect(),
    }));
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

pub use crate::shell::{is_variable_name as is_shell_name, quote as sh_quote};

/// The `-o env` text: one `KEY='value'` line per key (`KEY=` with `keys_only`), safe to
/// `source`: refused, naming the keys, when a key is not a shell variable name or a value holds
/// a NUL byte (a shell variable cannot) — nothing is printed then.
pub fn env_file(resolved: &Resolved, keys_only: bool) -> Result<String, CliError> {
    let pairs: Vec<(&str, &str)> = resolved
        .iter()
        .map(|(k, r)| (k.as_str(), r.value.expose()))
        .collect();
    env_text(&pairs, keys_only)
}

/// [`env_file`] of any keys and values (`resolve -f`: resolved and templated keys).
pub fn env_text(pairs: &[(&str, &str)], keys_only: bool) -> Result<String, CliError> {
    let bad: Vec<&str> = pairs
        .iter()
        .map(|(k, _)| *k)
        .filter(|k| !is_shell_name(k))
        .collect();
    if !bad.is_empty() {
        return Err(CliError::Usage(format!(
            "-o env writes shell variables, and {bad:?} {} not a shell variable name (letters, digits and '_', not starting with a digit): use -o json",
            if bad.len() == 1 { "is" } else { "are" }
        )));
    }
    let mut out = String::new();
    for (k, value) in pairs {
        if keys_only {
            out.push_str(&format!("{k}=\n"));
            continue;
        }
        if value.contains('\0') {
            return Err(CliError::Usage(format!(
                "the value of {k} holds a NUL byte, which a shell variable cannot: use -o json"
            )));
        }
        out.push_str(&format!("{k}={}\n", sh_quote(value)));
    }
    Ok(out)
}

/// A scope with the names that select it, e.g. `environment-service (shop / dev / api)`.
pub fn source_label(scope: &str, coords: &Coordinates) -> String {
    let mut parts = vec![coords.project.as_str()];
    if scope.starts_with("environment") {
        parts.extend(coords.environment.as_deref());
    }
    if scope.ends_with("service") {
        parts.extend(coords.service.as_deref());
    }
    format!("{scope} ({})", parts.join(" / "))
}

/// The table, masked unless `show`.
pub fn table(rows: &[Row], coords: &Coordinates) -> String {
    let kw = rows.iter().map(|r| r.key.len()).max().unwrap_or(0).max(3);
    let values: Vec<String> = rows
        .iter()
        .map(|r| r.value.clone().unwrap_or_else(|| "****".into()))
        .collect();
    let vw = values.iter().map(String::len).max().unwrap_or(0).max(5);
    let mut out = format!("{:kw$}  {:vw$}  SOURCE\n", "KEY", "VALUE");
    for (r, v) in rows.iter().zip(values) {
        if r.scope == "template" {
            out.push_str(&format!(
                "{:kw$}  {v:vw$}  template {} <- {}\n",
                r.key,
                r.path,
                r.inputs.join(", ")
            ));
            continue;
        }
        out.push_str(&format!(
            "{:kw$}  {v:vw$}  {} {} v{}\n",
            r.key,
            source_label(&r.scope, coords),
            r.path,
            r.version
        ));
    }
    out
}

/// Every scope's say on `key`, lowest precedence first, and which one wins.
pub fn explain(layers: &[ScopeData], key: &str, show: bool) -> String {
    let winner = resolve(layers).get(key).map(|r| r.source.scope);
    let mut out = String::new();
    for l in layers {
        let what = match l.entries.get(key) {
            Some(Entry::Value(v)) if show => v.expose().to_string(),
            Some(Entry::Value(_)) => "****".into(),
            Some(Entry::Tombstone) => "<unset: hides inherited values>".into(),
            None => "-".into(),
        };
        let version = l
            .version
            .map_or("(no secret)".to_string(), |v| format!("v{v}"));
        let mark = if Some(l.scope) == winner && matches!(l.entries.get(key), Some(Entry::Value(_)))
        {
            "  <- wins"
        } else {
            ""
        };
        out.push_str(&format!(
            "{:20} {} {version}: {what}{mark}\n",
            l.scope.as_str(),
            l.path
        ));
    }
    if winner.is_none() {
        out.push_str(&format!("{key} is not in the result\n"));
    }
    out
}

/// Every scope of `coords` in the default layout, read with the CLI's token.
async fn read_layers(vault: &VaultArgs, coords: &Coordinates) -> Result<Vec<ScopeData>, CliError> {
    let address = vault.address();
    let client = vault.client()?;
    let kv = Kv {
        client: &client,
        address: &address,
        mount: &vault.mount,
        method: "token",
        timeout: std::time::Duration::from_secs(10),
        requests: None,
    };
    let paths = Layout::default().paths(coords);
    Ok(try_join_all(paths.iter().map(|p| kv.read_scope(p))).await?)
}

/// Runs `resolve`, printing to stdout.
pub async fn run(args: ResolveArgs, vault: &VaultArgs) -> Result<(), CliError> {
    if let Some(k) = &args.explain {
        check_key(k)?;
    }
    if args.keys_only && args.output != Output::Env {
        return Err(CliError::Usage("--keys-only goes with -o env".into()));
    }
    if let Some(file) = &args.file {
        return run_file(&args, file, vault).await;
    }
    let coords = args
        .scope
        .as_ref()
        .ok_or_else(|| {
            CliError::Usage("give -p PROJECT (with -e, -s), or -f SCOPEDSECRET.yaml".into())
        })?
        .coordinates()?;
    let layers = read_layers(vault, &coords).await?;
    if let Some(key) = &args.explain {
        print!("{}", explain(&layers, key, args.show_values));
        return Ok(());
    }
    let resolved = resolve(&layers);
    match args.output {
        Output::Table => print!("{}", table(&rows(&resolved, args.show_values), &coords)),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&rows(&resolved, args.show_values))
                .expect("rows serialise")
        ),
        Output::Yaml => print!(
            "{}",
            serde_yaml::to_string(&rows(&resolved, args.show_values)).expect("rows serialise")
        ),
        Output::Env => print!("{}", env_file(&resolved, args.keys_only)?),
    }
    Ok(())
}

/// A ScopedSecret and the ConfigMaps given with it.
#[derive(Debug)]
pub struct Manifest {
    pub scoped_secret: ScopedSecret,
    pub files: template::Files,
}

/// Reads one ScopedSecret (and any ConfigMaps) from YAML documents.
pub fn parse_manifest(yaml: &str) -> Result<Manifest, CliError> {
    let mut found = Vec::new();
    let mut files = template::Files::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|e| CliError::Usage(format!("failed to read the manifest: {e}")))?;
        match value.get("kind").and_then(|k| k.as_str()) {
            Some("ScopedSecret") => found.push(
                serde_yaml::from_value::<ScopedSecret>(value)
                    .map_err(|e| CliError::Usage(format!("invalid ScopedSecret: {e}")))?,
            ),
            Some("ConfigMap") => {
                let cm: k8s_openapi::api::core::v1::ConfigMap = serde_yaml::from_value(value)
                    .map_err(|e| CliError::Usage(format!("invalid ConfigMap: {e}")))?;
                files.insert(
                    cm.metadata.name.unwrap_or_default(),
                    cm.data.unwrap_or_default(),
                );
            }
            _ => {}
        }
    }
    match found.len() {
        1 => Ok(Manifest {
            scoped_secret: found.remove(0),
            files,
        }),
        0 => Err(CliError::Usage("the file holds no ScopedSecret".into())),
        n => Err(CliError::Usage(format!(
            "the file holds {n} ScopedSecrets; give one per file"
        ))),
    }
}

/// The coordinates of a ScopedSecret: its spec, then the flags (standing in for the
/// namespace's labels), then its name for the service.
pub fn manifest_coordinates(
    ss: &ScopedSecret,
    flags: Option<&ScopeArgs>,
) -> Result<Coordinates, CliError> {
    let project = ss
        .spec
        .project
        .clone()
        .or_else(|| flags.map(|f| f.project.clone()))
        .ok_or_else(|| {
            CliError::Usage(
                "the ScopedSecret has no spec.project (the operator takes it from the namespace label scopedsecrets.io/project): give -p".into(),
            )
        })?;
    let environment = ss
        .spec
        .environment
        .clone()
        .or_else(|| flags.and_then(|f| f.environment.clone()));
    let service = ss
        .spec
        .service
        .clone()
        .or_else(|| flags.and_then(|f| f.service.clone()))
        .or_else(|| ss.metadata.name.clone());
    Ok(Coordinates::new(
        &project,
        environment.as_deref(),
        service.as_deref(),
    )?)
}

/// `resolve -f`: the keys the operator would write for a ScopedSecret manifest.
async fn run_file(
    args: &ResolveArgs,
    file: &std::path::Path,
    vault: &VaultArgs,
) -> Result<(), CliError> {
    let yaml = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(file)
    }
    .map_err(|e| CliError::Usage(format!("failed to read {}: {e}", file.display())))?;
    let manifest = parse_manifest(&yaml)?;
    let ss = &manifest.scoped_secret;
    let coords = manifest_coordinates(ss, args.scope.as_ref())?;
    let layers = read_layers(vault, &coords).await?;
    if let Some(key) = &args.explain {
        print!("{}", explain(&layers, key, args.show_values));
        return Ok(());
    }
    let resolved = crate::resolve::select(resolve(&layers), ss.spec.keys.as_deref())
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let spec = crate::pipeline::template_spec(ss);
    let output = template::apply(resolved, spec, &manifest.files)
        .map_err(|e| CliError::Usage(format!("invalid template: {e}")))?;
    let rows = output_rows(&output, args.show_values);
    match args.output {
        Output::Table => print!("{}", table(&rows, &coords)),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&rows).expect("rows serialise")
        ),
        Output::Yaml => print!("{}", serde_yaml::to_string(&rows).expect("rows serialise")),
        Output::Env => {
            let data: Vec<(String, String)> = output
                .secret_data()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                .collect();
            let pairs: Vec<(&str, &str)> =
                data.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            print!("{}", env_text(&pairs, args.keys_only)?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::SecretValue;
    use crate::scope::Scope;

    fn layers() -> Vec<ScopeData> {
        let layer =
            |scope: Scope, path: &str, v: u64, entries: Vec<(&str, Option<&str>)>| ScopeData {
                scope,
                path: path.into(),
                version: Some(v),
                entries: entries
                    .into_iter()
                    .map(|(k, v)| {
                        let e = v.map_or(Entry::Tombstone, |v| Entry::Value(SecretValue::new(v)));
                        (k.to_string(), e)
                    })
                    .collect(),
                custom_metadata: Default::default(),
            };
        vec![
            layer(
                Scope::Project,
                "shop",
                1,
                vec![("FOO", Some("p")), ("BAR", Some("b"))],
            ),
            layer(
                Scope::Environment,
                "shop/envs/dev",
                4,
                vec![("FOO", Some("e")), ("BAR", None)],
            ),
        ]
    }

    #[test]
    fn rows_follow_the_spec_shape_and_hide_values_unless_asked() {
        let r = resolve(&layers());
        let json = serde_json::to_value(rows(&r, false)).unwrap();
        assert_eq!(
            json,
            serde_json::json!([{"key": "FOO", "scope": "environment", "path": "shop/envs/dev", "version": 4}])
        );
        let json = serde_json::to_value(rows(&r, true)).unwrap();
        assert_eq!(json[0]["value"], "e");
        let coords = Coordinates::new("shop", Some("dev"), Some("api")).unwrap();
        let t = table(&rows(&r, false), &coords);
        assert!(!t.contains(" e "), "{t}");
        assert!(
            t.contains("FOO  ****   environment (shop / dev) shop/envs/dev v4"),
            "{t}"
        );
        assert_eq!(
            source_label("environment-service", &coords),
            "environment-service (shop / dev / api)"
        );
        assert_eq!(source_label("service", &coords), "service (shop / api)");
        assert_eq!(source_label("project", &coords), "project (shop)");
    }

    #[test]
    fn explain_lists_every_scope_and_the_winner() {
        let text = explain(&layers(), "FOO", true);
        assert!(text.contains("project              shop v1: p\n"), "{text}");
        assert!(
            text.contains("environment          shop/envs/dev v4: e  <- wins"),
            "{text}"
        );
        let text = explain(&layers(), "BAR", false);
        assert!(text.contains("<unset"), "{text}");
        assert!(text.contains("BAR is not in the result"), "{text}");
        assert!(!text.contains(": b"), "masked: {text}");
    }

    /// The example ScopedSecret over the scopes `examples/seed-scopes.sh` writes.
    #[test]
    fn the_example_builds_database_url_from_the_shop_scopes() {
        let yaml = include_str!("../../examples/20-scopedsecret-api.yaml");
        let manifest = parse_manifest(yaml).unwrap();
        let flags = ScopeArgs {
            project: "shop".into(),
            environment: Some("dev".into()),
            service: None,
        };
        let coords = manifest_coordinates(&manifest.scoped_secret, Some(&flags)).unwrap();
        assert_eq!(
            coords.to_string(),
            Coordinates::new("shop", Some("dev"), Some("api"))
                .unwrap()
                .to_string()
        );
        let layer = |scope, path: &str, entries: &[(&str, &str)]| ScopeData {
            scope,
            path: path.into(),
            version: Some(1),
            entries: entries
                .iter()
                .map(|(k, v)| (k.to_string(), Entry::Value(SecretValue::new(*v))))
                .collect(),
            custom_metadata: Default::default(),
        };
        // As seeded: DB_USER for the service, DB_HOST for dev, DB_PASSWORD for dev's api.
        let resolved = resolve(&[
            layer(Scope::Project, "shop", &[("DB_HOST", "db.shop.internal")]),
            layer(Scope::Service, "shop/services/api", &[("DB_USER", "api")]),
            layer(
                Scope::Environment,
                "shop/envs/dev",
                &[("DB_HOST", "db.dev.shop.internal")],
            ),
            layer(
                Scope::EnvironmentService,
                "shop/envs/dev/services/api",
                &[("DB_PASSWORD", "api-dev-password")],
            ),
        ]);
        let spec = manifest
            .scoped_secret
            .spec
            .target
            .as_ref()
            .and_then(|t| t.template.as_ref());
        let output = template::apply(resolved, spec, &manifest.files).unwrap();
        assert_eq!(
            output.templated["DATABASE_URL"].value.expose(),
            "postgres://api:api-dev-password@db.dev.shop.internal:5432/shop"
        );
        let t = table(&output_rows(&output, false), &coords);
        assert!(
            t.contains("DATABASE_URL  ****   template spec.target.template.data <- DB_HOST, DB_PASSWORD, DB_USER\n"),
            "{t}"
        );
        assert!(!t.contains("api-dev-password"), "{t}");
    }

    #[test]
    fn a_manifest_holds_one_scopedsecret_and_its_config_maps() {
        let yaml = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: t}\ndata: {a.json: '{}'}\n---\n\
                    apiVersion: scopedsecrets.io/v1alpha1\nkind: ScopedSecret\nmetadata: {name: web}\n\
                    spec: {storeRef: {name: v}, project: shop}\n";
        let m = parse_manifest(yaml).unwrap();
        assert_eq!(m.files["t"]["a.json"], "{}");
        let coords = manifest_coordinates(&m.scoped_secret, None).unwrap();
        assert_eq!(
            coords.service.as_deref(),
            Some("web"),
            "the name is the service"
        );
        assert_eq!(coords.environment, None);
        let no_project = parse_manifest(&yaml.replace(", project: shop", "")).unwrap();
        let e = manifest_coordinates(&no_project.scoped_secret, None).unwrap_err();
        assert!(e.to_string().contains("give -p"), "{e}");
        assert!(parse_manifest("kind: ConfigMap\nmetadata: {name: t}\n").is_err());
    }

    #[test]
    fn the_scope_flags_are_optional_with_a_file_only() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cmd {
            #[command(flatten)]
            args: ResolveArgs,
        }
        let parsed = Cmd::try_parse_from(["resolve", "-f", "ss.yaml"]).unwrap();
        assert!(parsed.args.scope.is_none());
        let parsed =
            Cmd::try_parse_from(["resolve", "-f", "ss.yaml", "-p", "shop", "-e", "dev"]).unwrap();
        assert_eq!(
            parsed.args.scope.unwrap().environment.as_deref(),
            Some("dev")
        );
        assert!(Cmd::try_parse_from(["resolve"]).is_err());
        assert!(Cmd::try_parse_from(["resolve", "-e", "dev"]).is_err());
    }

    fn one_key(key: &str, value: &str) -> Resolved {
        resolve(&[ScopeData {
            scope: Scope::Project,
            path: "shop".into(),
            version: Some(1),
            entries: [(key.to_string(), Entry::Value(SecretValue::new(value)))].into(),
            custom_metadata: Default::default(),
        }])
    }

    #[test]
    fn env_values_are_single_quoted_with_quotes_escaped() {
        assert_eq!(sh_quote("abc-1.2"), "'abc-1.2'");
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("it's $(x) `y`"), r"'it'\''s $(x) `y`'");
        assert_eq!(sh_quote("a\nb\r"), "'a\nb\r'");
        assert_eq!(
            env_file(&one_key("DB_URL", "p'w"), false).unwrap(),
            "DB_URL='p'\\''w'\n"
        );
        assert_eq!(
            env_file(&one_key("DB_URL", "x"), true).unwrap(),
            "DB_URL=\n"
        );
    }

    #[test]
    fn env_refuses_keys_that_are_no_shell_variable_and_nul_bytes() {
        for key in ["db.host", "1ST", "A-B", "X;rm"] {
            let err = env_file(&one_key(key, "v"), false).unwrap_err().to_string();
            assert!(
                err.contains(&format!("{key:?}")) && err.contains("-o json"),
                "{err}"
            );
            assert!(env_file(&one_key(key, "v"), true).is_err(), "{key}");
        }
        for key in ["A", "_a1", "DB_HOST"] {
            assert!(is_shell_name(key), "{key}");
        }
        let err = env_file(&one_key("K", "a\0b"), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("NUL") && !err.contains("a\0b"), "{err}");
    }
}
