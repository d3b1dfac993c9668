//! `scoped-secrets resolve`: the effective values of a project / environment / service and
//! where each comes from — the operator's own resolution, run from the command line.

use clap::{Args, ValueEnum};
use futures::future::try_join_all;
use serde::Serialize;

use super::{CliError, ScopeArgs, VaultArgs, check_key};
use crate::resolve::{Entry, Resolved, ScopeData, resolve};
use crate::scope::{Coordinates, Layout};
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
pub struct ResolveArgs {
    #[command(flatten)]
    pub scope: ScopeArgs,
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
        })
        .collect()
}

/// Whether `key` can be a shell variable: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_shell_name(key: &str) -> bool {
    let mut bytes = key.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Quotes a value for `sh`: between single quotes every byte is literal — `$`, backticks,
/// backslashes, newlines and carriage returns included —, and a `'` is written as `'\''`
/// (close the quote, an escaped quote, open it again).
pub fn sh_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// The `-o env` text: one `KEY='value'` line per key (`KEY=` with `keys_only`), safe to
/// `source`: refused, naming the keys, when a key is not a shell variable name or a value holds
/// a NUL byte (a shell variable cannot) — nothing is printed then.
pub fn env_file(resolved: &Resolved, keys_only: bool) -> Result<String, CliError> {
    let bad: Vec<&str> = resolved
        .keys()
        .filter(|k| !is_shell_name(k))
        .map(String::as_str)
        .collect();
    if !bad.is_empty() {
        return Err(CliError::Usage(format!(
            "-o env writes shell variables, and {bad:?} {} not a shell variable name (letters, digits and '_', not starting with a digit): use -o json",
            if bad.len() == 1 { "is" } else { "are" }
        )));
    }
    let mut out = String::new();
    for (k, r) in resolved {
        if keys_only {
            out.push_str(&format!("{k}=\n"));
            continue;
        }
        let value = r.value.expose();
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

/// Runs `resolve`, printing to stdout.
pub async fn run(args: ResolveArgs, vault: &VaultArgs) -> Result<(), CliError> {
    let coords = args.scope.coordinates()?;
    if let Some(k) = &args.explain {
        check_key(k)?;
    }
    if args.keys_only && args.output != Output::Env {
        return Err(CliError::Usage("--keys-only goes with -o env".into()));
    }
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
    let paths = Layout::default().paths(&coords);
    let layers = try_join_all(paths.iter().map(|p| kv.read_scope(p))).await?;
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
