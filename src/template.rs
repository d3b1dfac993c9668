//! Templates (pure): Secret keys built from the resolved keys — a `DATABASE_URL` from its
//! parts, a `config.json` from a ConfigMap — with minijinja, a small Jinja2 engine.
//!
//! Runs after resolution and rotation (a template can read `new,old`) and before the Secret
//! is built. Each template records the resolved keys it reads, so `status.keys` can name a
//! templated key's inputs and their scopes. The engine is configured for untrusted templates:
//! strict undefined variables, no loader (no files), no macros or includes, no debug info,
//! a shared budget of fuel per ScopedSecret (which bounds both time and memory), a recursion
//! limit and a size limit per template. Error messages are written here from the error's
//! kind and line: minijinja's own details can quote a value (`unable to calculate …`), so
//! only details known to be value-free are kept.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use k8s_openapi::ByteString;
use minijinja::value::{Enumerator, Object, ObjectRepr, Value, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior};

use crate::api::v1alpha1::{MergePolicy, TargetTemplate};
use crate::resolve::{MAX_SECRET_BYTES, Resolved, SecretValue, Source, is_valid_key};

/// Largest template text, in bytes.
pub const MAX_TEMPLATE_BYTES: usize = 64 * 1024;
/// Fuel shared by all templates of one ScopedSecret: about one unit per instruction and per
/// 64 bytes of data created, so this bounds a render to ~250k instructions and ~16 MiB.
pub const FUEL: u64 = 250_000;
/// Nesting depth of loops and conditions at run time.
const RECURSION_LIMIT: usize = 100;

/// ConfigMap name → its `data`, for the ConfigMaps `templateFrom` names (absent: not found).
pub type Files = BTreeMap<String, BTreeMap<String, String>>;

/// Where a template comes from. Named in errors and in `status.keys[].path`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    /// `spec.target.template.data.<key>`.
    Data { key: String },
    /// A key of a ConfigMap named by `spec.target.template.templateFrom`.
    ConfigMap { name: String, key: String },
}

impl Origin {
    /// Short form for `status.keys[].path`.
    pub fn path(&self) -> String {
        match self {
            Origin::Data { .. } => "spec.target.template.data".into(),
            Origin::ConfigMap { name, key } => format!("configmap/{name}/{key}"),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Data { key } => write!(f, "spec.target.template.data.{key}"),
            Origin::ConfigMap { name, key } => write!(f, "ConfigMap {name} key {key}"),
        }
    }
}

/// One templated key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub value: SecretValue,
    pub origin: Origin,
    /// The resolved keys the template read, with their sources.
    pub inputs: BTreeMap<String, Source>,
}

/// Templated keys by name.
pub type Templated = BTreeMap<String, Rendered>;

/// The keys of the Secret once templates are applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    /// Resolved keys written as they are: all of them under `Merge` except those a template
    /// replaces, none under `Replace`.
    pub resolved: Resolved,
    pub templated: Templated,
}

impl Output {
    /// The Secret's data: resolved and templated keys.
    pub fn secret_data(&self) -> BTreeMap<String, ByteString> {
        let mut data = crate::render::secret_data(&self.resolved);
        data.extend(
            self.templated
                .iter()
                .map(|(k, r)| (k.clone(), ByteString(r.value.expose().as_bytes().to_vec()))),
        );
        data
    }

    /// Number of keys written.
    pub fn len(&self) -> usize {
        self.resolved.len() + self.templated.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why templates could not be applied (`InvalidTemplate`). Never holds a value: messages are
/// built from the error's kind, the template's origin and line, and key names.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("failed to render {origin}{}: {problem}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Render {
        origin: Origin,
        line: Option<usize>,
        problem: String,
    },
    #[error(
        "{origin} is {size} bytes, over the {MAX_TEMPLATE_BYTES}-byte limit of one template; split it"
    )]
    TooLarge { origin: Origin, size: usize },
    #[error("the templates of this ScopedSecret total {size} bytes, over the 1 MiB limit")]
    TooMuchText { size: usize },
    #[error(
        "{origin} writes the key {key:?}, which is not a valid Secret key: use letters, digits, '-', '_' and '.'"
    )]
    InvalidKey { origin: Origin, key: String },
    #[error("{first} and {second} both write the key {key:?}; give one of them another name")]
    Duplicate {
        key: String,
        first: Origin,
        second: Origin,
    },
    #[error(
        "ConfigMap {name} (spec.target.template.templateFrom[{index}]) does not exist in the ScopedSecret's namespace; create it or fix the name"
    )]
    ConfigMapNotFound { name: String, index: usize },
    #[error(
        "ConfigMap {name} has no key {key:?} in its data (spec.target.template.templateFrom[{index}].configMap.items); add it or fix the item"
    )]
    MissingItem {
        name: String,
        key: String,
        index: usize,
    },
    #[error(
        "spec.target.template has mergePolicy Replace and no templates, so the Secret would be empty; add data or templateFrom, or use Merge"
    )]
    NothingToWrite,
    #[error(
        "the Secret would hold {size} bytes after templates, over the 1 MiB limit of a Kubernetes Secret"
    )]
    SecretTooLarge { size: usize },
}

/// Applies `spec.target.template` to the resolved keys. `files` holds the `data` of the
/// ConfigMaps its `templateFrom` names.
pub fn apply(
    resolved: Resolved,
    spec: Option<&TargetTemplate>,
    files: &Files,
) -> Result<Output, TemplateError> {
    let Some(spec) = spec else {
        return Ok(Output {
            resolved,
            templated: BTreeMap::new(),
        });
    };
    let sources = sources(spec, files)?;
    if sources.is_empty() && spec.merge_policy == MergePolicy::Replace {
        return Err(TemplateError::NothingToWrite);
    }
    let templated = render_all(&resolved, &sources)?;
    let resolved = match spec.merge_policy {
        MergePolicy::Merge => resolved
            .into_iter()
            .filter(|(k, _)| !templated.contains_key(k))
            .collect(),
        MergePolicy::Replace => Resolved::new(),
    };
    let output = Output {
        resolved,
        templated,
    };
    let size: usize = output
        .secret_data()
        .iter()
        .map(|(k, v)| k.len() + v.0.len())
        .sum();
    if size > MAX_SECRET_BYTES {
        return Err(TemplateError::SecretTooLarge { size });
    }
    Ok(output)
}

/// The names of the ConfigMaps `spec` reads templates from.
pub fn config_maps(spec: Option<&TargetTemplate>) -> BTreeSet<String> {
    spec.into_iter()
        .flat_map(|s| &s.template_from)
        .map(|t| t.config_map.name.clone())
        .collect()
}

/// One template to render.
struct TemplateSource<'a> {
    key: String,
    origin: Origin,
    text: &'a str,
    /// Whole files keep their final newline; an inline value drops one, as Jinja does (a YAML
    /// block scalar `|` ends with one).
    whole_file: bool,
}

/// Every template of `spec`, checked: valid and distinct output keys, sizes.
fn sources<'a>(
    spec: &'a TargetTemplate,
    files: &'a Files,
) -> Result<Vec<TemplateSource<'a>>, TemplateError> {
    let mut out: Vec<TemplateSource<'a>> = Vec::new();
    for (key, text) in &spec.data {
        out.push(TemplateSource {
            key: key.clone(),
            origin: Origin::Data { key: key.clone() },
            text,
            whole_file: false,
        });
    }
    for (index, from) in spec.template_from.iter().enumerate() {
        let cm = &from.config_map;
        let data = files
            .get(&cm.name)
            .ok_or_else(|| TemplateError::ConfigMapNotFound {
                name: cm.name.clone(),
                index,
            })?;
        let items: Vec<(&str, &str)> = if cm.items.is_empty() {
            data.keys().map(|k| (k.as_str(), k.as_str())).collect()
        } else {
            cm.items
                .iter()
                .map(|i| (i.key.as_str(), i.as_.as_deref().unwrap_or(&i.key)))
                .collect()
        };
        for (key, as_) in items {
            let text = data.get(key).ok_or_else(|| TemplateError::MissingItem {
                name: cm.name.clone(),
                key: key.to_string(),
                index,
            })?;
            out.push(TemplateSource {
                key: as_.to_string(),
                origin: Origin::ConfigMap {
                    name: cm.name.clone(),
                    key: key.to_string(),
                },
                text,
                whole_file: true,
            });
        }
    }
    // Compiling is not metered by fuel: the text is bounded instead.
    let total: usize = out.iter().map(|s| s.text.len()).sum();
    if total > MAX_SECRET_BYTES {
        return Err(TemplateError::TooMuchText { size: total });
    }
    let mut seen: BTreeMap<&str, &Origin> = BTreeMap::new();
    for s in &out {
        if !is_valid_key(&s.key) {
            return Err(TemplateError::InvalidKey {
                origin: s.origin.clone(),
                key: s.key.clone(),
            });
        }
        if let Some(first) = seen.insert(&s.key, &s.origin) {
            return Err(TemplateError::Duplicate {
                key: s.key.clone(),
                first: first.clone(),
                second: s.origin.clone(),
            });
        }
        if s.text.len() > MAX_TEMPLATE_BYTES {
            return Err(TemplateError::TooLarge {
                origin: s.origin.clone(),
                size: s.text.len(),
            });
        }
    }
    Ok(out)
}

/// Renders every template against the resolved keys, from one shared fuel budget.
fn render_all(
    resolved: &Resolved,
    sources: &[TemplateSource<'_>],
) -> Result<Templated, TemplateError> {
    let values: Arc<BTreeMap<String, Value>> = Arc::new(
        resolved
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.value.expose())))
            .collect(),
    );
    let names: Vec<String> = sources.iter().map(|s| s.origin.to_string()).collect();
    let mut env = environment();
    let mut fuel = FUEL;
    let mut out = BTreeMap::new();
    for (source, name) in sources.iter().zip(&names) {
        env.set_fuel(Some(fuel));
        env.set_syntax(syntax(source.whole_file));
        let lookups = Arc::new(Lookups {
            values: values.clone(),
            read: Mutex::default(),
            missed: Mutex::default(),
        });
        let fail = |err: &minijinja::Error, rendering: bool| TemplateError::Render {
            origin: source.origin.clone(),
            line: err.line(),
            problem: problem(err, rendering, &lookups, source.text),
        };
        let template = env
            .template_from_named_str(name, source.text)
            .map_err(|e| fail(&e, false))?;
        let captured = template
            .render_captured(Value::from_object(Root(lookups.clone())))
            .map_err(|e| fail(&e, true))?;
        let consumed = captured.state().fuel_levels().map_or(0, |(used, _)| used);
        fuel = fuel.saturating_sub(consumed);
        let inputs = lookups
            .read
            .lock()
            .unwrap()
            .iter()
            .filter_map(|k| resolved.get(k).map(|r| (k.clone(), r.source.clone())))
            .collect();
        out.insert(
            source.key.clone(),
            Rendered {
                value: SecretValue::new(captured.into_output()),
                origin: source.origin.clone(),
                inputs,
            },
        );
    }
    Ok(out)
}

fn syntax(keep_trailing_newline: bool) -> minijinja::syntax::SyntaxConfig {
    minijinja::syntax::SyntaxConfig::builder()
        .keep_trailing_newline(keep_trailing_newline)
        .build()
        .expect("the default delimiters are valid")
}

/// The engine as templates get it: Jinja's built-in filters and tests, strict undefined
/// variables, no auto-escaping (an output key named `config.json` must not change how values
/// print), the limits, and the filters credentials need.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_recursion_limit(RECURSION_LIMIT);
    // `debug()` prints the engine's state: of no use in a Secret.
    env.remove_global("debug");
    env.add_filter("urlencode", urlencode);
    env.add_filter("b64encode", b64encode);
    env.add_filter("b64decode", b64decode);
    env.add_filter("quote", quote);
    env.add_filter("toenv", toenv);
    env.add_filter("toproperties", toproperties);
    env
}

/// Error details the filters below produce: the only render-time details shown to users.
const FILTER_ERRORS: &[&str] = &[
    URLENCODE_ERROR,
    B64DECODE_ERROR,
    B64DECODE_UTF8_ERROR,
    MAP_ERROR,
    ENV_NAME_ERROR,
    STRING_VALUE_ERROR,
    NUL_ERROR,
];
const URLENCODE_ERROR: &str = "urlencode expects a string or a number";
const B64DECODE_ERROR: &str = "b64decode: the value is not valid base64";
const B64DECODE_UTF8_ERROR: &str = "b64decode: the decoded bytes are not UTF-8 text";
const MAP_ERROR: &str = "toenv and toproperties expect a map, such as `keys`";
const ENV_NAME_ERROR: &str =
    "toenv: a key is not an environment variable name (letters, digits and '_', not first a digit)";
const NUL_ERROR: &str = "toenv: a value holds a NUL byte, which an environment variable cannot";
const STRING_VALUE_ERROR: &str = "toenv and toproperties expect string or number values";

/// A user-facing description of `err`, never containing a value.
fn problem(err: &minijinja::Error, rendering: bool, lookups: &Lookups, text: &str) -> String {
    let kind = err.kind();
    let detail = err.detail().unwrap_or_default();
    // Compiling sees only the template's text, which is not secret.
    if !rendering {
        return match err.detail() {
            Some(d) => format!("{kind}: {d}"),
            None => kind.to_string(),
        };
    }
    match kind {
        ErrorKind::UndefinedError => {
            // A name looked up in `keys[...]` can be computed from a value: only names
            // written in the template's text are repeated.
            let missed = lookups.missed.lock().unwrap();
            let names: Vec<&str> = missed
                .iter()
                .map(String::as_str)
                .filter(|n| !GLOBALS.contains(n) && written_in(text, n))
                .collect();
            if names.is_empty() {
                "undefined value; use only resolved keys, or guard with `| default(...)` or `is defined`".into()
            } else {
                format!(
                    "undefined value (not resolved keys: {}); fix the names, or guard with `| default(...)` or `is defined`",
                    names.join(", ")
                )
            }
        }
        ErrorKind::OutOfFuel => format!(
            "the templates used up their budget of work and memory ({FUEL} fuel per ScopedSecret); simplify them"
        ),
        // The names come from the template's text.
        ErrorKind::UnknownFilter | ErrorKind::UnknownTest | ErrorKind::UnknownFunction => {
            format!("{kind}: {detail}")
        }
        ErrorKind::InvalidOperation if FILTER_ERRORS.contains(&detail) => detail.to_string(),
        ErrorKind::InvalidOperation if detail.contains("recursion") => {
            format!("nested deeper than {RECURSION_LIMIT} levels")
        }
        // Details of other errors can quote values: the kind only.
        _ => format!("{kind} (details withheld: they could contain a value)"),
    }
}

/// Whether `name` is written in `text` as a whole identifier or a quoted string.
fn written_in(text: &str, name: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    if [format!("'{name}'"), format!("\"{name}\"")]
        .iter()
        .any(|q| text.contains(q.as_str()))
    {
        return true;
    }
    text.match_indices(name).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + name.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

/// Global functions: a lookup of these by name tries the context first, which is not a
/// missing key.
const GLOBALS: &[&str] = &["range", "dict", "namespace", "loop"];

/// The resolved values of one render and which of them the template looked up.
struct Lookups {
    values: Arc<BTreeMap<String, Value>>,
    read: Mutex<BTreeSet<String>>,
    missed: Mutex<BTreeSet<String>>,
}

impl Lookups {
    fn get(&self, name: &str) -> Option<Value> {
        match self.values.get(name) {
            Some(v) => {
                self.read.lock().unwrap().insert(name.to_string());
                Some(v.clone())
            }
            None => {
                self.missed.lock().unwrap().insert(name.to_string());
                None
            }
        }
    }
}

/// The template's context: each resolved key by name, and the map `keys`.
struct Root(Arc<Lookups>);

/// `keys`: every resolved key, by any name.
struct Keys(Arc<Lookups>);

// Objects must be `Debug`; never print a value.
impl fmt::Debug for Root {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} resolved keys>", self.0.values.len())
    }
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} resolved keys>", self.0.values.len())
    }
}

impl Object for Root {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let name = key.as_str()?;
        if name == "keys" {
            return Some(Value::from_object(Keys(self.0.clone())));
        }
        self.0.get(name)
    }
}

impl Object for Keys {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.0.get(key.as_str()?)
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        // Names only: a value counts as read when it is looked up.
        let names: Vec<Value> = self
            .0
            .values
            .keys()
            .map(|k| Value::from(k.as_str()))
            .collect();
        Enumerator::Values(names)
    }
}

fn invalid(detail: &'static str) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, detail)
}

/// A string or number as text.
fn text(value: &Value) -> Option<String> {
    match value.kind() {
        ValueKind::String => value.as_str().map(str::to_string),
        ValueKind::Number => Some(value.to_string()),
        _ => None,
    }
}

/// Percent-encodes everything but `A-Z a-z 0-9 - . _ ~` (RFC 3986 unreserved), so the result
/// is safe in any part of a URL. Unlike Jinja's `urlencode`, `/` is encoded too: a password
/// with a `/` must not end a URL's user-info.
fn urlencode(value: Value) -> Result<String, minijinja::Error> {
    let s = text(&value).ok_or_else(|| invalid(URLENCODE_ERROR))?;
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Ok(out)
}

fn b64encode(value: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(value)
}

fn b64decode(value: &str) -> Result<String, minijinja::Error> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|_| invalid(B64DECODE_ERROR))?;
    String::from_utf8(bytes).map_err(|_| invalid(B64DECODE_UTF8_ERROR))
}

/// POSIX shell single quotes: `it's` → `'it'\''s'`.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// The (name, text) pairs of a map, sorted by name.
fn pairs(value: &Value) -> Result<Vec<(String, String)>, minijinja::Error> {
    if value.kind() != ValueKind::Map {
        return Err(invalid(MAP_ERROR));
    }
    let mut out = Vec::new();
    for key in value.try_iter().map_err(|_| invalid(MAP_ERROR))? {
        let name = key.as_str().ok_or_else(|| invalid(MAP_ERROR))?.to_string();
        let item = value.get_item(&key).map_err(|_| invalid(MAP_ERROR))?;
        out.push((
            name,
            text(&item).ok_or_else(|| invalid(STRING_VALUE_ERROR))?,
        ));
    }
    out.sort();
    Ok(out)
}

/// A `.env` file: `NAME='value'` lines, quoted as `scoped-secrets resolve -o env` quotes them
/// (POSIX single quotes: `set -a; . ./.env` reads every byte back as it was).
fn toenv(value: Value) -> Result<String, minijinja::Error> {
    let mut out = String::new();
    for (name, v) in pairs(&value)? {
        if !crate::shell::is_variable_name(&name) {
            return Err(invalid(ENV_NAME_ERROR));
        }
        if v.contains('\0') {
            return Err(invalid(NUL_ERROR));
        }
        out.push_str(&format!("{name}={}\n", crate::shell::quote(&v)));
    }
    Ok(out)
}

/// A Java `.properties` file: `name=value` lines, escaped as `Properties.load` reads them
/// (ISO 8859-1 with `\uXXXX` for everything else).
fn toproperties(value: Value) -> Result<String, minijinja::Error> {
    let mut out = String::new();
    for (name, v) in pairs(&value)? {
        out.push_str(&properties_escape(&name, true));
        out.push('=');
        out.push_str(&properties_escape(&v, false));
        out.push('\n');
    }
    Ok(out)
}

fn properties_escape(s: &str, is_key: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, c) in s.chars().enumerate() {
        match c {
            '\\' => out.push_str(r"\\"),
            '\n' => out.push_str(r"\n"),
            '\r' => out.push_str(r"\r"),
            '\t' => out.push_str(r"\t"),
            '\u{c}' => out.push_str(r"\f"),
            // A leading space would be skipped; in a key these end it or start a comment.
            ' ' if i == 0 || is_key => out.push_str(r"\ "),
            '=' | ':' | '#' | '!' if is_key || i == 0 => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04X}"));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::v1alpha1::{ConfigMapTemplates, TemplateFrom, TemplateItem};
    use crate::resolve::{Entry, ScopeData, resolve};
    use crate::scope::Scope;

    const CANARY: &str = "canary-s3cr3t/value";

    fn resolved(pairs: &[(&str, &str)]) -> Resolved {
        resolve(&[
            ScopeData {
                scope: Scope::Project,
                path: "shop".into(),
                version: Some(3),
                entries: pairs
                    .iter()
                    .filter(|(k, _)| !k.starts_with("DB_"))
                    .map(|(k, v)| (k.to_string(), Entry::Value(SecretValue::new(*v))))
                    .collect(),
                custom_metadata: Default::default(),
            },
            ScopeData {
                scope: Scope::Environment,
                path: "shop/envs/dev".into(),
                version: Some(7),
                entries: pairs
                    .iter()
                    .filter(|(k, _)| k.starts_with("DB_"))
                    .map(|(k, v)| (k.to_string(), Entry::Value(SecretValue::new(*v))))
                    .collect(),
                custom_metadata: Default::default(),
            },
        ])
    }

    fn db() -> Resolved {
        resolved(&[
            ("DB_USER", "app"),
            ("DB_PASSWORD", "p@ss/w:rd"),
            ("DB_HOST", "db.shop"),
            ("API-KEY", "k1"),
            ("UNRELATED", "u"),
        ])
    }

    fn data(pairs: &[(&str, &str)]) -> TargetTemplate {
        TargetTemplate {
            data: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn render_one(r: &Resolved, text: &str) -> Result<String, TemplateError> {
        let out = apply(r.clone(), Some(&data(&[("OUT", text)])), &Files::new())?;
        Ok(out.templated["OUT"].value.expose().to_string())
    }

    fn one(text: &str) -> String {
        render_one(&db(), text).unwrap()
    }

    fn err(r: &Resolved, text: &str) -> String {
        render_one(r, text).unwrap_err().to_string()
    }

    #[test]
    fn database_url_is_built_from_its_parts_with_an_encoded_password() {
        let out = apply(
            db(),
            Some(&data(&[(
                "DATABASE_URL",
                "postgres://{{ DB_USER }}:{{ DB_PASSWORD | urlencode }}@{{ DB_HOST }}/app",
            )])),
            &Files::new(),
        )
        .unwrap();
        let url = &out.templated["DATABASE_URL"];
        assert_eq!(
            url.value.expose(),
            "postgres://app:p%40ss%2Fw%3Ard@db.shop/app"
        );
        assert_eq!(
            url.inputs.keys().collect::<Vec<_>>(),
            ["DB_HOST", "DB_PASSWORD", "DB_USER"]
        );
        assert_eq!(url.inputs["DB_USER"].path, "shop/envs/dev");
        assert_eq!(url.inputs["DB_USER"].version, 7);
        // Merge: the resolved keys stay.
        assert_eq!(out.resolved.len(), 5);
        assert_eq!(out.secret_data().len(), 6);
    }

    #[test]
    fn keys_map_reaches_names_that_are_not_identifiers_and_records_them() {
        let out = apply(
            db(),
            Some(&data(&[("K", "{{ keys['API-KEY'] }}/{{ keys.DB_HOST }}")])),
            &Files::new(),
        )
        .unwrap();
        assert_eq!(out.templated["K"].value.expose(), "k1/db.shop");
        assert_eq!(
            out.templated["K"].inputs.keys().collect::<Vec<_>>(),
            ["API-KEY", "DB_HOST"]
        );
        assert_eq!(out.templated["K"].inputs["API-KEY"].scope, Scope::Project);
    }

    #[test]
    fn iterating_keys_reads_every_key() {
        let out = apply(
            db(),
            Some(&data(&[("ENV", "{{ keys | length }}")])),
            &Files::new(),
        )
        .unwrap();
        assert_eq!(out.templated["ENV"].value.expose(), "5");
        assert!(
            out.templated["ENV"].inputs.is_empty(),
            "counting keys reads no value"
        );
        let out = apply(
            db(),
            Some(&data(&[(
                "ALL",
                "{% for k, v in keys | items %}{{ k }}{% endfor %}",
            )])),
            &Files::new(),
        )
        .unwrap();
        assert_eq!(out.templated["ALL"].inputs.len(), 5);
    }

    #[test]
    fn every_filter_does_what_its_name_says() {
        let r = resolved(&[
            ("A", " Mixed Case "),
            ("LIST", "a,b,c"),
            ("B64", "aGVsbG8="),
            ("Q", "it's"),
            ("J", "say \"hi\"\n<tag>"),
        ]);
        let one = |t: &str| render_one(&r, t).unwrap();
        assert_eq!(one("{{ A | urlencode }}"), "%20Mixed%20Case%20");
        assert_eq!(
            one("{{ 'a/b?c=d&e~f.g_h-i' | urlencode }}"),
            "a%2Fb%3Fc%3Dd%26e~f.g_h-i"
        );
        assert_eq!(one("{{ 'é' | urlencode }}"), "%C3%A9");
        assert_eq!(one("{{ 'hello' | b64encode }}"), "aGVsbG8=");
        assert_eq!(one("{{ B64 | b64decode }}"), "hello");
        assert_eq!(one("{{ J | tojson }}"), r#""say \"hi\"\n\u003ctag\u003e""#);
        assert_eq!(one("{{ A | upper }}"), " MIXED CASE ");
        assert_eq!(one("{{ A | lower }}"), " mixed case ");
        assert_eq!(one("[{{ A | trim }}]"), "[Mixed Case]");
        assert_eq!(one("{{ LIST | split(',') | join(' ') }}"), "a b c");
        assert_eq!(one("{{ LIST | split(',') | first }}"), "a");
        assert_eq!(one("{{ MISSING | default('dflt') }}"), "dflt");
        assert_eq!(one("{{ keys.MISSING | default('dflt') }}"), "dflt");
        assert_eq!(one("{{ Q | quote }}"), r"'it'\''s'");
        assert_eq!(one("{{ A | quote }}"), "' Mixed Case '");
        assert_eq!(
            one("{{ {'B': Q, 'A': A, 'N': 5} | toenv }}"),
            "A=' Mixed Case '\nB='it'\\''s'\nN='5'\n"
        );
        assert_eq!(
            one("{{ {'db.url': 'jdbc:x://h/d?a=b', ' k:=': ' v#\\\\ é 😀'} | toproperties }}"),
            "\\ k\\:\\==\\ v#\\\\ \\u00E9 \\uD83D\\uDE00\ndb.url=jdbc:x://h/d?a=b\n"
        );
    }

    #[test]
    fn whole_files_from_config_maps_keep_their_final_newline() {
        let spec = TargetTemplate {
            data: [("INLINE".to_string(), "{{ DB_USER }}\n".to_string())].into(),
            template_from: vec![
                TemplateFrom {
                    config_map: ConfigMapTemplates {
                        name: "app".into(),
                        items: vec![TemplateItem {
                            key: "config.json".into(),
                            as_: Some("app.json".into()),
                        }],
                    },
                },
                TemplateFrom {
                    config_map: ConfigMapTemplates {
                        name: "env".into(),
                        items: vec![],
                    },
                },
            ],
            ..Default::default()
        };
        let files: Files = [
            (
                "app".to_string(),
                [
                    (
                        "config.json".to_string(),
                        "{\"user\": {{ DB_USER | tojson }}}\n".to_string(),
                    ),
                    ("unused".to_string(), "{{ NOPE }}".to_string()),
                ]
                .into(),
            ),
            (
                "env".to_string(),
                [(
                    ".env".to_string(),
                    "{{ {'DB_USER': DB_USER, 'DB_PASSWORD': DB_PASSWORD} | toenv }}".to_string(),
                )]
                .into(),
            ),
        ]
        .into();
        let out = apply(db(), Some(&spec), &files).unwrap();
        assert_eq!(out.templated["INLINE"].value.expose(), "app");
        assert_eq!(
            out.templated["app.json"].value.expose(),
            "{\"user\": \"app\"}\n"
        );
        assert_eq!(
            out.templated["app.json"].origin,
            Origin::ConfigMap {
                name: "app".into(),
                key: "config.json".into()
            }
        );
        assert_eq!(
            out.templated["app.json"].origin.path(),
            "configmap/app/config.json"
        );
        assert!(
            !out.templated.contains_key("unused"),
            "only the listed items"
        );
        let env = out.templated[".env"].value.expose();
        assert_eq!(env, "DB_PASSWORD='p@ss/w:rd'\nDB_USER='app'\n");
    }

    #[test]
    fn a_key_that_is_not_an_environment_name_is_refused_by_toenv() {
        let e = err(&db(), "{{ keys | toenv }}");
        assert!(
            e.contains("toenv: a key is not an environment variable name"),
            "{e}"
        );
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn replace_writes_only_templated_keys_and_merge_lets_templates_win() {
        let mut spec = data(&[("DB_USER", "{{ DB_USER | upper }}")]);
        let merged = apply(db(), Some(&spec), &Files::new()).unwrap();
        assert_eq!(merged.secret_data()["DB_USER"].0, b"APP");
        assert!(!merged.resolved.contains_key("DB_USER"));
        assert_eq!(merged.len(), 5);
        spec.merge_policy = MergePolicy::Replace;
        let replaced = apply(db(), Some(&spec), &Files::new()).unwrap();
        assert_eq!(
            replaced.secret_data().keys().collect::<Vec<_>>(),
            ["DB_USER"]
        );
        let nothing = TargetTemplate {
            merge_policy: MergePolicy::Replace,
            ..Default::default()
        };
        assert_eq!(
            apply(db(), Some(&nothing), &Files::new()),
            Err(TemplateError::NothingToWrite)
        );
        assert_eq!(apply(db(), None, &Files::new()).unwrap().resolved, db());
    }

    #[test]
    fn undefined_names_are_errors_naming_the_key_line_and_name() {
        let e = err(&db(), "line one\n{{ DB_USR }}");
        assert_eq!(
            e,
            "failed to render spec.target.template.data.OUT, line 2: undefined value (not resolved keys: DB_USR); fix the names, or guard with `| default(...)` or `is defined`"
        );
        let e = err(&db(), "{{ keys['NOPE'] | upper }}");
        assert!(e.contains("NOPE"), "{e}");
        assert_eq!(
            one("{% if GONE is defined %}{{ GONE }}{% endif %}{{ range(2) | join }}"),
            "01"
        );
    }

    #[test]
    fn syntax_errors_name_the_key_and_line() {
        let e = err(&db(), "a\nb {{ DB_USER ");
        assert!(
            e.starts_with("failed to render spec.target.template.data.OUT, line 2: syntax error"),
            "{e}"
        );
        let e = err(&db(), "{{ DB_USER | nosuchfilter }}");
        assert!(
            e.contains("unknown filter") && e.contains("nosuchfilter"),
            "{e}"
        );
    }

    #[test]
    fn no_files_includes_macros_environment_or_clock() {
        for t in [
            "{% include 'x' %}",
            "{% import 'x' as y %}",
            "{% macro m() %}{% endmacro %}",
            "{{ env('HOME') }}",
            "{{ now() }}",
            "{{ debug() }}",
            "{{ lookup('file', '/etc/passwd') }}",
        ] {
            assert!(render_one(&db(), t).is_err(), "{t} must not render");
        }
    }

    #[test]
    fn limits_stop_runaway_templates() {
        let e = err(
            &db(),
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        );
        assert!(e.contains("budget of work and memory"), "{e}");
        // Doubling a string in a loop: fuel counts the bytes too.
        let e = err(
            &db(),
            "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
        );
        assert!(e.contains("budget of work and memory"), "{e}");
        let e = err(&db(), &"{% if true %}".repeat(200));
        assert!(e.contains("syntax error") || e.contains("nested"), "{e}");
        let files: Files = [(
            "big".to_string(),
            (0..17)
                .map(|i| (format!("f{i}"), "y".repeat(MAX_TEMPLATE_BYTES)))
                .collect(),
        )]
        .into();
        let spec = TargetTemplate {
            template_from: vec![TemplateFrom {
                config_map: ConfigMapTemplates {
                    name: "big".into(),
                    items: vec![],
                },
            }],
            ..Default::default()
        };
        assert!(matches!(
            apply(db(), Some(&spec), &files),
            Err(TemplateError::TooMuchText { .. })
        ));
        let big = "x".repeat(MAX_TEMPLATE_BYTES + 1);
        assert!(matches!(
            render_one(&db(), &big),
            Err(TemplateError::TooLarge { .. })
        ));
        // The budget is shared by the templates of one ScopedSecret.
        let heavy = "{% for i in range(30000) %}{% endfor %}";
        let many: Vec<(String, String)> = (0..20)
            .map(|i| (format!("K{i}"), heavy.to_string()))
            .collect();
        let spec = TargetTemplate {
            data: many.into_iter().collect(),
            ..Default::default()
        };
        assert!(apply(db(), Some(&spec), &Files::new()).is_err());
        let huge = resolved(&[("BIG", &"y".repeat(600 * 1024))]);
        assert!(matches!(
            render_one(&huge, "{{ BIG }}"),
            Err(TemplateError::SecretTooLarge { .. })
        ));
    }

    #[test]
    fn output_keys_must_be_valid_and_distinct_and_config_maps_must_exist() {
        assert!(matches!(
            apply(db(), Some(&data(&[("bad key", "x")])), &Files::new()),
            Err(TemplateError::InvalidKey { .. })
        ));
        let from = |name: &str, key: &str, as_: Option<&str>| TemplateFrom {
            config_map: ConfigMapTemplates {
                name: name.into(),
                items: vec![TemplateItem {
                    key: key.into(),
                    as_: as_.map(Into::into),
                }],
            },
        };
        let files: Files = [(
            "app".to_string(),
            [("OUT".to_string(), "x".to_string())].into(),
        )]
        .into();
        let mut spec = data(&[("OUT", "y")]);
        spec.template_from = vec![from("app", "OUT", None)];
        let e = apply(db(), Some(&spec), &files).unwrap_err();
        assert_eq!(
            e.to_string(),
            "spec.target.template.data.OUT and ConfigMap app key OUT both write the key \"OUT\"; give one of them another name"
        );
        spec.template_from = vec![from("nope", "OUT", Some("X"))];
        assert_eq!(
            apply(db(), Some(&spec), &files),
            Err(TemplateError::ConfigMapNotFound {
                name: "nope".into(),
                index: 0
            })
        );
        spec.template_from = vec![from("app", "missing", Some("X"))];
        assert!(matches!(
            apply(db(), Some(&spec), &files),
            Err(TemplateError::MissingItem { .. })
        ));
    }

    /// The recipes users copy: every YAML block of docs/templates.md's "Recipes" renders.
    #[test]
    fn the_documented_recipes_render() {
        let doc = include_str!("../docs/templates.md");
        let start = doc.find("## Recipes").unwrap();
        let section = &doc[start..];
        let section = &section[..section[3..].find("\n## ").unwrap()];
        let r = resolved(&[
            ("DB_USER", "app"),
            ("DB_PASSWORD", "p@ss\"w/rd é"),
            ("DB_HOST", "db"),
            ("REDIS_PASSWORD", "r:p"),
            ("REDIS_HOST", "redis"),
            ("API_KEYS", "new,old"),
            ("LOG_LEVEL", "debug"),
        ]);
        let mut blocks = 0;
        for block in section.split("```yaml\n").skip(1) {
            let yaml = &block[..block.find("```").unwrap()];
            let data: BTreeMap<String, String> = serde_yaml::from_str(yaml).unwrap();
            let spec = TargetTemplate {
                data,
                ..Default::default()
            };
            let out = apply(r.clone(), Some(&spec), &Files::new())
                .unwrap_or_else(|e| panic!("{yaml}: {e}"));
            blocks += 1;
            if let Some(url) = out.templated.get("DATABASE_URL") {
                assert_eq!(
                    url.value.expose(),
                    "postgres://app:p%40ss%22w%2Frd%20%C3%A9@db:5432/app?sslmode=require"
                );
            }
            if let Some(json) = out.templated.get("config.json") {
                let v: serde_json::Value = serde_json::from_str(json.value.expose()).unwrap();
                assert_eq!(v["database"]["password"], "p@ss\"w/rd é");
                assert_eq!(v["apiKeys"], serde_json::json!(["new", "old"]));
            }
            if let Some(props) = out.templated.get("application.properties") {
                assert!(
                    props
                        .value
                        .expose()
                        .contains("spring.datasource.password=p@ss\"w/rd \\u00E9\n"),
                    "{:?}",
                    props.value.expose()
                );
            }
        }
        assert_eq!(blocks, 4, "URL, JSON, .env, properties");
    }

    #[test]
    fn a_rotated_value_is_a_key_like_any_other() {
        let r = resolved(&[("API_KEYS", "new,old")]);
        assert_eq!(
            render_one(&r, "{{ API_KEYS | split(',') | join('\\n') }}").unwrap(),
            "new\nold"
        );
    }

    /// Every failing template over a value: no message contains the value, or a piece of it.
    #[test]
    fn error_messages_never_contain_a_value() {
        // minijinja's own message does quote values: the reason messages are built here.
        let pin = "918273645";
        let raw = environment()
            .render_str(
                "{{ PIN | int // 0 }}",
                [("PIN", pin)].into_iter().collect::<BTreeMap<_, _>>(),
            )
            .unwrap_err();
        assert!(format!("{raw:#}").contains(pin), "{raw:#}");
        let ours = err(&resolved(&[("PIN", pin)]), "{{ PIN | int // 0 }}");
        assert!(!ours.contains(pin), "{ours}");

        let r = resolved(&[("DB_PASSWORD", CANARY), ("N", "5")]);
        let failing = [
            "{{ DB_PASSWORD + 1 }}",
            "{{ DB_PASSWORD - 1 }}",
            "{{ DB_PASSWORD * DB_PASSWORD }}",
            "{{ DB_PASSWORD | int + N }}",
            "{{ DB_PASSWORD | b64decode }}",
            "{{ DB_PASSWORD | float / 0 }}",
            "{{ DB_PASSWORD.missing.deeper }}",
            "{{ DB_PASSWORD[99] }}",
            "{{ DB_PASSWORD() }}",
            "{{ DB_PASSWORD | attr(DB_PASSWORD) | upper }}",
            "{{ keys[DB_PASSWORD] | upper }}",
            "{{ {DB_PASSWORD: 1} | toenv }}",
            "{{ DB_PASSWORD | toenv }}",
            "{{ DB_PASSWORD | urlencode(DB_PASSWORD) }}",
            "{% for a, b in DB_PASSWORD %}{% endfor %}",
            "{{ DB_PASSWORD | round }}",
            "{{ N // 0 }}{{ DB_PASSWORD }}",
            "{{ DB_PASSWORD ~ DB_PASSWORD | tojson | b64decode }}",
            "{{ nosuch(DB_PASSWORD) }}",
            "{{ DB_PASSWORD | nosuch }}",
        ];
        for t in failing {
            let e = err(&r, t);
            for piece in ["canary", "s3cr3t", CANARY] {
                assert!(!e.contains(piece), "{t}: {e}");
            }
            // Debug formatting of the error too.
            let d = format!("{:?}", render_one(&r, t).unwrap_err());
            assert!(!d.contains("s3cr3t"), "{t}: {d}");
        }
    }
}
