//! Property tests (proptest) of the pure core, each against a small model of the contract:
//! resolution (most specific wins, tombstones, the source names the winning scope) and key
//! selection (include / exclude / rename), path layouts (no traversal, one path never names two
//! scopes or two coordinates), name validation equal to the CRD schema, and `resolve -o env`
//! read back by `sh`.
//!
//! Case counts are moderate (256; 48 for the `sh` round trip, which starts a process per case)
//! so CI stays quick. A failure prints the smallest case proptest found; rerun it with
//! `PROPTEST_CASES=10000 cargo nextest run --test properties` to search harder.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::Command;

use proptest::prelude::*;
use scoped_secrets::api::v1alpha1::{KeySelection, PathTemplate};
use scoped_secrets::cli::resolve::{env_file, is_shell_name};
use scoped_secrets::resolve::{
    Entry, Resolved, ScopeData, SecretValue, SelectError, Source, glob_match, is_valid_key,
    resolve, select,
};
use scoped_secrets::scope::{Coordinates, Layout, NameError, Scope, validate_name};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Keep failures reproducible without writing regression files into the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---- resolution -------------------------------------------------------------------------

/// Few key names, so that scopes share keys; `x.y` and `bad key` exercise key validation.
fn key() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["A", "B", "C", "DB_HOST", "x.y", "bad key"]).prop_map(String::from)
}

/// A value, or `None` for a tombstone.
fn entry() -> impl Strategy<Value = Option<String>> {
    prop::option::weighted(0.75, "[a-z]{0,3}")
}

/// Zero to four layers in precedence order, each present or missing (no version).
fn layers() -> impl Strategy<Value = Vec<ScopeData>> {
    let layer = |scope: Scope| {
        (
            any::<bool>(),
            prop::option::weighted(0.85, 1u64..50),
            prop::collection::btree_map(key(), entry(), 0..5),
        )
            .prop_map(move |(present, version, entries)| {
                present.then(|| ScopeData {
                    scope,
                    path: format!("shop/{}", scope.as_str()),
                    version,
                    // A path with no version holds nothing.
                    entries: if version.is_some() {
                        entries
                            .into_iter()
                            .map(|(k, v)| {
                                let e = v.map_or(Entry::Tombstone, |v| {
                                    Entry::Value(SecretValue::new(v))
                                });
                                (k, e)
                            })
                            .collect()
                    } else {
                        Default::default()
                    },
                    custom_metadata: BTreeMap::new(),
                })
            })
    };
    (
        layer(Scope::Project),
        layer(Scope::Service),
        layer(Scope::Environment),
        layer(Scope::EnvironmentService),
    )
        .prop_map(|(a, b, c, d)| [a, b, c, d].into_iter().flatten().collect())
}

/// The contract, key by key: the most specific scope that says anything about the key decides;
/// a value wins with its scope, path and version as the source, a tombstone removes the key.
fn model_resolve(layers: &[ScopeData]) -> BTreeMap<String, (String, Source)> {
    let keys: BTreeSet<&str> = layers.iter().flat_map(|l| l.entries.keys()).collect();
    let mut out = BTreeMap::new();
    for k in keys {
        let decider = layers
            .iter()
            .rev()
            .find(|l| l.version.is_some() && l.entries.contains_key(k));
        if let Some(l) = decider
            && let Some(Entry::Value(v)) = l.entries.get(k)
        {
            let source = Source {
                scope: l.scope,
                path: l.path.clone(),
                version: l.version.unwrap(),
            };
            out.insert(k.to_string(), (v.expose().to_string(), source));
        }
    }
    out
}

fn flatten(r: &Resolved) -> BTreeMap<String, (String, Source)> {
    r.iter()
        .map(|(k, v)| (k.clone(), (v.value.expose().to_string(), v.source.clone())))
        .collect()
}

fn pattern() -> impl Strategy<Value = String> {
    "[ABCDx*_.]{0,4}"
}

fn selection() -> impl Strategy<Value = KeySelection> {
    (
        prop::collection::vec(pattern(), 0..3),
        prop::collection::vec(pattern(), 0..2),
        prop::collection::btree_map(
            key(),
            prop::sample::select(vec!["A", "B", "renamed", "also.ok", "no/slash"])
                .prop_map(String::from),
            0..3,
        ),
    )
        .prop_map(|(include, exclude, rename)| KeySelection {
            include,
            exclude,
            rename,
        })
}

/// What selection should give: the keys included and not excluded, under their new names;
/// or which error comes first (keys in name order).
fn model_select(
    resolved: &BTreeMap<String, (String, Source)>,
    sel: &KeySelection,
) -> Result<BTreeMap<String, (String, Option<String>)>, &'static str> {
    let mut out = BTreeMap::new();
    for (name, (value, _)) in resolved {
        let included = sel.include.is_empty() || sel.include.iter().any(|p| glob_match(p, name));
        if !included || sel.exclude.iter().any(|p| glob_match(p, name)) {
            continue;
        }
        let (target, from) = match sel.rename.get(name) {
            Some(to) if !is_valid_key(to) => return Err("InvalidRename"),
            Some(to) => (to.clone(), Some(name.clone())),
            None if !is_valid_key(name) => return Err("InvalidKey"),
            None => (name.clone(), None),
        };
        if out.insert(target, (value.clone(), from)).is_some() {
            return Err("RenameCollision");
        }
    }
    Ok(out)
}

fn glob_regex(pattern: &str) -> regex::Regex {
    let parts: Vec<String> = pattern.split('*').map(regex::escape).collect();
    regex::Regex::new(&format!("^{}$", parts.join(".*"))).unwrap()
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn resolution_matches_most_specific_wins_with_tombstones(layers in layers()) {
        prop_assert_eq!(flatten(&resolve(&layers)), model_resolve(&layers));
    }

    #[test]
    fn a_value_set_at_the_most_specific_scope_always_wins(
        mut layers in layers(),
        value in "[a-z]{1,3}",
    ) {
        layers.push(ScopeData {
            scope: Scope::EnvironmentService,
            path: "top".into(),
            version: Some(99),
            entries: [("A".to_string(), Entry::Value(SecretValue::new(value.clone())))].into(),
            custom_metadata: BTreeMap::new(),
        });
        let r = resolve(&layers);
        prop_assert_eq!(r["A"].value.expose(), value.as_str());
        prop_assert_eq!(&r["A"].source.path, "top");
        // A tombstone on top removes it, whatever is below.
        layers.last_mut().unwrap().entries.insert("A".into(), Entry::Tombstone);
        prop_assert!(!resolve(&layers).contains_key("A"));
    }

    #[test]
    fn selection_includes_excludes_and_renames_as_specified(
        layers in layers(),
        sel in selection(),
    ) {
        let resolved = resolve(&layers);
        let want = model_select(&flatten(&resolved), &sel);
        match (select(resolved, Some(&sel)), want) {
            (Ok(got), Ok(want)) => {
                let got: BTreeMap<_, _> = got
                    .into_iter()
                    .map(|(k, v)| (k, (v.value.expose().to_string(), v.renamed_from)))
                    .collect();
                prop_assert_eq!(got, want);
            }
            (Err(e), Err(kind)) => {
                let got = match e {
                    SelectError::InvalidKey { .. } => "InvalidKey",
                    SelectError::InvalidRename { .. } => "InvalidRename",
                    SelectError::RenameCollision { .. } => "RenameCollision",
                    SelectError::TooLarge { .. } => "TooLarge",
                };
                prop_assert_eq!(got, kind);
            }
            (got, want) => prop_assert!(false, "select gave {:?}, the model {:?}", got.map(|r| r.len()), want.map(|r| r.len())),
        }
    }

    #[test]
    fn glob_matches_exactly_what_a_shell_star_matches(
        pattern in "[ab*]{0,6}",
        name in "[ab]{0,6}",
    ) {
        prop_assert_eq!(glob_match(&pattern, &name), glob_regex(&pattern).is_match(&name));
    }
}

// ---- path layouts -----------------------------------------------------------------------

/// A fixed segment: names, one no name can be, and (rarely) the pieces a careless layout is
/// made of.
fn fixed_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(vec!["envs", "services", "x", "a-b", "@"]),
        1 => prop::sample::select(vec![
            "{project}-{service}",
            "svc-{service}",
            "{environment}.d",
            "{project}",
            "..",
            ".",
            "",
            "{team}",
            "{project",
        ]),
    ]
    .prop_map(String::from)
}

/// A template for `scope`: mostly its placeholders and up to three fixed segments, in any
/// order; sometimes one that glues placeholders into one segment.
fn template(scope: Scope) -> impl Strategy<Value = String> {
    let glued = match scope {
        Scope::Project => vec!["p-{project}", "{project}.d"],
        Scope::Service => vec!["{project}-{service}", "{project}/svc-{service}"],
        Scope::Environment => vec!["{project}-{environment}", "{project}/{environment}.d"],
        Scope::EnvironmentService => vec![
            "{project}/{environment}-{service}",
            "{project}{environment}/{service}",
        ],
    };
    prop_oneof![
        9 => segmented(scope),
        1 => prop::sample::select(glued).prop_map(String::from),
    ]
}

fn segmented(scope: Scope) -> impl Strategy<Value = String> {
    let mut placeholders = vec!["{project}".to_string()];
    if matches!(scope, Scope::Environment | Scope::EnvironmentService) {
        placeholders.push("{environment}".into());
    }
    if matches!(scope, Scope::Service | Scope::EnvironmentService) {
        placeholders.push("{service}".into());
    }
    prop::collection::vec(fixed_segment(), 0..4)
        .prop_flat_map(move |fixed| {
            let mut all = placeholders.clone();
            all.extend(fixed);
            Just(all).prop_shuffle()
        })
        .prop_map(|segments| segments.join("/"))
}

/// One to four templates for distinct scopes, in a random order.
fn templates() -> impl Strategy<Value = Vec<PathTemplate>> {
    (Just(Scope::ALL.to_vec()).prop_shuffle(), 1..=4usize)
        .prop_flat_map(|(scopes, n)| {
            scopes[..n]
                .iter()
                .map(|s| (Just(*s), template(*s)))
                .collect::<Vec<_>>()
        })
        .prop_map(|pairs| {
            pairs
                .into_iter()
                .map(|(scope, template)| PathTemplate { scope, template })
                .collect()
        })
}

/// Names that look like the fixed segments above, so that a collision has every chance.
/// `a-b` + `x` and `a` + `b-x` glue into the same `a-b-x`.
const NAMES: [&str; 6] = ["x", "a", "a-b", "b-x", "envs", "services"];

fn all_coordinates() -> Vec<Coordinates> {
    let opt = || std::iter::once(None).chain(NAMES.iter().map(|n| Some(*n)));
    let mut out = Vec::new();
    for p in NAMES {
        for e in opt() {
            for s in opt() {
                out.push(Coordinates::new(p, e, s).unwrap());
            }
        }
    }
    out
}

/// Project, environment and service, where the scope uses them.
type Names = (String, Option<String>, Option<String>);

/// The coordinates a scope's path depends on.
fn relevant(scope: Scope, c: &Coordinates) -> Names {
    let env = matches!(scope, Scope::Environment | Scope::EnvironmentService);
    let svc = matches!(scope, Scope::Service | Scope::EnvironmentService);
    (
        c.project.clone(),
        c.environment.clone().filter(|_| env),
        c.service.clone().filter(|_| svc),
    )
}

/// Whether `template` produces `path` for some coordinates.
fn produces(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len()
        && t.iter().zip(&p).all(|(t, p)| {
            if t.starts_with('{') {
                validate_name("name", p).is_ok()
            } else {
                t == p
            }
        })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn accepted_layouts_never_climb_out_and_never_share_a_path(templates in templates()) {
        let Ok(layout) = Layout::from_templates(&templates) else {
            return Ok(());
        };
        let mut owner: HashMap<String, (Scope, Names)> = HashMap::new();
        for c in all_coordinates() {
            for p in layout.paths(&c) {
                prop_assert!(!p.path.starts_with('/') && !p.path.ends_with('/'), "{}", p.path);
                prop_assert!(
                    p.path.split('/').all(|s| !s.is_empty() && s != "." && s != ".."),
                    "{}", p.path
                );
                prop_assert!(p.path.split('/').any(|s| s == c.project), "{} lacks the project", p.path);
                let who = (p.scope, relevant(p.scope, &c));
                if let Some(before) = owner.insert(p.path.clone(), who.clone()) {
                    prop_assert_eq!(&before, &who, "{} names two scopes or coordinates", p.path);
                }
            }
        }
    }

    #[test]
    fn a_refused_overlap_is_a_real_one(templates in templates()) {
        if let Err(NameError::Overlap { first_template, second_template, example, .. }) =
            Layout::from_templates(&templates)
        {
            prop_assert!(produces(&first_template, &example), "{first_template} / {example}");
            prop_assert!(produces(&second_template, &example), "{second_template} / {example}");
        }
    }
}

#[test]
fn the_default_layout_is_accepted_when_spelled_out() {
    let spelled: Vec<PathTemplate> = Scope::ALL
        .iter()
        .map(|s| PathTemplate {
            scope: *s,
            template: s.default_template().into(),
        })
        .collect();
    assert_eq!(Layout::from_templates(&spelled).unwrap(), Layout::default());
}

// ---- names ------------------------------------------------------------------------------

/// The `pattern`, `minLength` and `maxLength` of one name field in the generated CRD, read once.
fn crd_name_schema(field: &str) -> &'static (regex::Regex, usize, usize) {
    static SCHEMAS: std::sync::OnceLock<HashMap<&'static str, (regex::Regex, usize, usize)>> =
        std::sync::OnceLock::new();
    &SCHEMAS.get_or_init(|| {
        ["project", "environment", "service"]
            .into_iter()
            .map(|f| (f, read_crd_name_schema(f)))
            .collect()
    })[field]
}

fn read_crd_name_schema(field: &str) -> (regex::Regex, usize, usize) {
    let docs: Vec<serde_yaml::Value> =
        serde_yaml::Deserializer::from_str(&scoped_secrets::crd::all_crds_yaml())
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
    let ss = docs
        .iter()
        .find(|d| d["spec"]["names"]["kind"] == "ScopedSecret")
        .unwrap();
    let f = &ss["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        [field];
    (
        regex::Regex::new(f["pattern"].as_str().unwrap()).unwrap(),
        f["minLength"].as_u64().unwrap() as usize,
        f["maxLength"].as_u64().unwrap() as usize,
    )
}

fn name_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9._/ -]{0,8}",
        "[a-z.]{0,6}",
        "[a-z]{60,66}",
        "[a-z]{30}\\.[a-z]{30,33}",
        ".{0,5}",
    ]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn name_validation_equals_the_crd_schema(name in name_like()) {
        for field in ["project", "environment", "service"] {
            let (pattern, min, max) = crd_name_schema(field);
            // The API server counts characters for minLength / maxLength.
            let len = name.chars().count();
            let schema_ok = pattern.is_match(&name) && (*min..=*max).contains(&len);
            prop_assert_eq!(validate_name(field, &name).is_ok(), schema_ok, "{:?} ({})", name, field);
        }
    }
}

// ---- `resolve -o env` -------------------------------------------------------------------

fn resolved_of(values: &BTreeMap<String, String>) -> Resolved {
    resolve(&[ScopeData {
        scope: Scope::Project,
        path: "shop".into(),
        version: Some(1),
        entries: values
            .iter()
            .map(|(k, v)| (k.clone(), Entry::Value(SecretValue::new(v.clone()))))
            .collect(),
        custom_metadata: BTreeMap::new(),
    }])
}

/// Values with what a shell would mangle: quotes, `$()`, backticks, backslashes, spaces,
/// newlines, carriage returns, tabs, unicode — anything but NUL.
fn shell_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ '\"$`\\\\(){};|&<>*?~#!\n\r\tA-Za-z0-9=.,-]{0,16}",
        any::<String>().prop_map(|s| s.replace('\0', "")),
    ]
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn env_output_reads_back_unchanged_in_sh(
        // `K_` keeps generated names off the shell's own variables (PATH, IFS, …).
        values in prop::collection::btree_map("K_[A-Za-z0-9_]{0,6}", shell_value(), 1..5),
    ) {
        let text = env_file(&resolved_of(&values), false).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("env"), &text).unwrap();
        // Each value into its own file: `printf %s` adds nothing and drops nothing.
        let script: Vec<String> = values
            .keys()
            .enumerate()
            .map(|(i, k)| format!("printf %s \"${k}\" > out{i}"))
            .collect();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(". ./env && {}", script.join(" && ")))
            .current_dir(dir.path())
            .output()
            .unwrap();
        prop_assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), text);
        for (i, v) in values.values().enumerate() {
            let got = std::fs::read(dir.path().join(format!("out{i}"))).unwrap();
            prop_assert_eq!(got, v.as_bytes(), "{}", text);
        }
        prop_assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            values.len() + 1,
            "a value ran a command"
        );
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn env_output_is_refused_for_keys_that_are_no_shell_variable(key in "[A-Za-z0-9_.-]{1,6}") {
        let values = BTreeMap::from([(key.clone(), "v".to_string())]);
        let shell_name = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        prop_assert_eq!(is_shell_name(&key), shell_name);
        prop_assert_eq!(env_file(&resolved_of(&values), false).is_ok(), shell_name);
    }
}
