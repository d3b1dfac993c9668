//! Scopes, their coordinates and their Vault paths (pure).
//!
//! A value lives at one of four scopes of a project; the path of each scope comes from a
//! per-store template. Names are validated here, once, for the CRD fields, the namespace
//! labels they may come from and the CLI alike.

use std::fmt;

use crate::api::v1alpha1::PathTemplate;
pub use crate::api::v1alpha1::ScopeName as Scope;

impl Scope {
    /// All scopes, lowest precedence first.
    pub const ALL: [Scope; 4] = [
        Scope::Project,
        Scope::Service,
        Scope::Environment,
        Scope::EnvironmentService,
    ];

    /// The scope's name as users write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Project => "project",
            Scope::Service => "service",
            Scope::Environment => "environment",
            Scope::EnvironmentService => "environment-service",
        }
    }

    /// The default KV path template of the scope.
    pub fn default_template(self) -> &'static str {
        match self {
            Scope::Project => "{project}",
            Scope::Service => "{project}/services/{service}",
            Scope::Environment => "{project}/envs/{environment}",
            Scope::EnvironmentService => "{project}/envs/{environment}/services/{service}",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which project, environment and service a resolution is for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Coordinates {
    pub project: String,
    pub environment: Option<String>,
    pub service: Option<String>,
}

impl fmt::Display for Coordinates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "project {}", self.project)?;
        if let Some(env) = &self.environment {
            write!(f, ", environment {env}")?;
        }
        if let Some(svc) = &self.service {
            write!(f, ", service {svc}")?;
        }
        Ok(())
    }
}

/// One scope's resolved KV path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ScopePath {
    pub scope: Scope,
    pub path: String,
}

/// A bad name or template. Names are not secret, so they are quoted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("{field} is empty")]
    Empty { field: String },
    #[error("{field} {value:?} is longer than 63 characters")]
    TooLong { field: String, value: String },
    #[error(
        "{field} {value:?} is not a valid name: use letters, digits, '_', '-' and single dots between them (no '/', no '..')"
    )]
    Invalid { field: String, value: String },
    #[error("spec.paths[{index}] (scope {scope}, template {template:?}) {problem}")]
    Template {
        index: usize,
        scope: Scope,
        template: String,
        problem: String,
    },
    #[error(
        "spec.paths[{index}] names scope {scope} again (spec.paths[{first}] already does): give each scope one template"
    )]
    DuplicateScope {
        index: usize,
        first: usize,
        scope: Scope,
    },
    #[error(
        "spec.paths[{first}] ({first_template:?}) and spec.paths[{second}] ({second_template:?}) can name the same Vault path (e.g. {example:?}), so one scope's values would be read as another's: make them differ in a fixed segment, as the default layout's \"{{project}}/services/{{service}}\" and \"{{project}}/envs/{{environment}}\" do"
    )]
    Overlap {
        first: usize,
        first_template: String,
        second: usize,
        second_template: String,
        example: String,
    },
}

/// Checks a project, environment or service name. `field` names it in the error.
pub fn validate_name(field: &str, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty {
            field: field.into(),
        });
    }
    if value.len() > 63 {
        return Err(NameError::TooLong {
            field: field.into(),
            value: value.into(),
        });
    }
    let segment_ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    if !value.split('.').all(segment_ok) {
        return Err(NameError::Invalid {
            field: field.into(),
            value: value.into(),
        });
    }
    Ok(())
}

impl Coordinates {
    /// Builds coordinates, validating each name.
    pub fn new(
        project: &str,
        environment: Option<&str>,
        service: Option<&str>,
    ) -> Result<Self, NameError> {
        validate_name("project", project)?;
        if let Some(e) = environment {
            validate_name("environment", e)?;
        }
        if let Some(s) = service {
            validate_name("service", s)?;
        }
        Ok(Coordinates {
            project: project.into(),
            environment: environment.map(Into::into),
            service: service.map(Into::into),
        })
    }
}

/// The ordered path templates of a store, lowest precedence first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    entries: Vec<(Scope, String)>,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            entries: Scope::ALL
                .iter()
                .map(|s| (*s, s.default_template().to_string()))
                .collect(),
        }
    }
}

const PLACEHOLDERS: [&str; 3] = ["project", "environment", "service"];

impl Layout {
    /// Builds a layout from a store's `paths`; empty means the default layout.
    ///
    /// Refused, naming `spec.paths[i]`: a bad template (see `check_template`), a scope named
    /// twice, and two templates that can produce the same path — then one scope's values
    /// would be read (and written by the CLI) as another's.
    pub fn from_templates(templates: &[PathTemplate]) -> Result<Self, NameError> {
        if templates.is_empty() {
            return Ok(Layout::default());
        }
        let mut entries: Vec<(Scope, String)> = Vec::with_capacity(templates.len());
        for (index, t) in templates.iter().enumerate() {
            if let Some(first) = entries.iter().position(|(s, _)| *s == t.scope) {
                return Err(NameError::DuplicateScope {
                    index,
                    first,
                    scope: t.scope,
                });
            }
            check_template(index, t.scope, &t.template)?;
            for (first, (_, earlier)) in entries.iter().enumerate() {
                if let Some(example) = shared_path(earlier, &t.template) {
                    return Err(NameError::Overlap {
                        first,
                        first_template: earlier.clone(),
                        second: index,
                        second_template: t.template.clone(),
                        example,
                    });
                }
            }
            entries.push((t.scope, t.template.clone()));
        }
        Ok(Layout { entries })
    }

    /// The KV path of every scope that applies to `coords`, lowest precedence first. A
    /// template that needs an environment or service the coordinates lack is skipped.
    pub fn paths(&self, coords: &Coordinates) -> Vec<ScopePath> {
        self.entries
            .iter()
            .filter_map(|(scope, template)| {
                let mut path = template.replace("{project}", &coords.project);
                if template.contains("{environment}") {
                    path = path.replace("{environment}", coords.environment.as_deref()?);
                }
                if template.contains("{service}") {
                    path = path.replace("{service}", coords.service.as_deref()?);
                }
                Some(ScopePath {
                    scope: *scope,
                    path,
                })
            })
            .collect()
    }

    /// The path of one scope, if the layout has it and the coordinates fill it.
    pub fn path_of(&self, scope: Scope, coords: &Coordinates) -> Option<String> {
        self.paths(coords)
            .into_iter()
            .find(|p| p.scope == scope)
            .map(|p| p.path)
    }
}

/// A placeholder segment's name (`{project}` → `project`), `None` for a fixed segment.
fn placeholder(segment: &str) -> Option<&str> {
    segment
        .strip_prefix('{')?
        .strip_suffix('}')
        .filter(|name| !name.contains(['{', '}']))
}

/// Checks one template: relative, no empty, `.` or `..` segment, every placeholder a whole
/// segment used once, and exactly the placeholders of its scope. With placeholders as whole
/// segments and names that cannot hold `/`, a path names its coordinates unambiguously:
/// `{project}-{service}` could not tell project `a-b` service `c` from project `a` service `b-c`.
fn check_template(index: usize, scope: Scope, template: &str) -> Result<(), NameError> {
    let err = |problem: &str| NameError::Template {
        index,
        scope,
        template: template.into(),
        problem: problem.into(),
    };
    if template.is_empty() {
        return Err(err("is empty"));
    }
    if template.starts_with('/') || template.ends_with('/') {
        return Err(err("must not start or end with '/'"));
    }
    let mut used: Vec<&str> = Vec::new();
    for segment in template.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err(err("has an empty, '.' or '..' segment"));
        }
        let Some(name) = placeholder(segment) else {
            if segment.contains(['{', '}']) {
                return Err(err(&format!(
                    "has segment {segment:?}: a placeholder must be a whole path segment, separated from the rest by '/' (e.g. \"{{project}}/{{service}}\", not \"{{project}}-{{service}}\"), so that two different projects, environments or services never share a path"
                )));
            }
            continue;
        };
        if !PLACEHOLDERS.contains(&name) {
            return Err(err(&format!(
                "has unknown placeholder {segment}; use {{project}}, {{environment}} or {{service}}"
            )));
        }
        if used.contains(&name) {
            return Err(err(&format!("uses {segment} twice")));
        }
        used.push(name);
    }
    if !used.contains(&"project") {
        return Err(err(
            "must contain {project}, or projects would share values",
        ));
    }
    let expected_env = matches!(scope, Scope::Environment | Scope::EnvironmentService);
    let expected_svc = matches!(scope, Scope::Service | Scope::EnvironmentService);
    if used.contains(&"environment") != expected_env || used.contains(&"service") != expected_svc {
        return Err(err(&format!(
            "must use exactly the placeholders of scope {scope} ({})",
            match scope {
                Scope::Project => "{project}",
                Scope::Service => "{project}, {service}",
                Scope::Environment => "{project}, {environment}",
                Scope::EnvironmentService => "{project}, {environment}, {service}",
            }
        )));
    }
    Ok(())
}

/// A path that both (checked) templates can produce, for some coordinates each, if any.
///
/// Each placeholder is a whole segment used once per template, so the two templates' names are
/// independent of each other: they meet exactly when they have as many segments and, segment
/// by segment, two fixed segments are equal or a placeholder can take the other's value (any
/// name, or a fixed segment that is a valid name).
fn shared_path(a: &str, b: &str) -> Option<String> {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.split('/').collect(), b.split('/').collect());
    if a.len() != b.len() {
        return None;
    }
    let fits = |fixed: &str| validate_name("name", fixed).is_ok();
    a.iter()
        .zip(&b)
        .map(|(x, y)| match (placeholder(x), placeholder(y)) {
            (Some(_), Some(_)) => Some("x"),
            (Some(_), None) => fits(y).then_some(*y),
            (None, Some(_)) => fits(x).then_some(*x),
            (None, None) => (x == y).then_some(*x),
        })
        .collect::<Option<Vec<_>>>()
        .map(|segments| segments.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coords(env: Option<&str>, svc: Option<&str>) -> Coordinates {
        Coordinates::new("shop", env, svc).unwrap()
    }

    #[test]
    fn default_layout_gives_the_four_spec_paths_in_precedence_order() {
        let paths = Layout::default().paths(&coords(Some("dev"), Some("api")));
        let got: Vec<_> = paths.iter().map(|p| (p.scope, p.path.as_str())).collect();
        assert_eq!(
            got,
            vec![
                (Scope::Project, "shop"),
                (Scope::Service, "shop/services/api"),
                (Scope::Environment, "shop/envs/dev"),
                (Scope::EnvironmentService, "shop/envs/dev/services/api"),
            ]
        );
    }

    #[test]
    fn without_environment_only_project_and_service_scopes_apply() {
        let paths = Layout::default().paths(&coords(None, Some("api")));
        let scopes: Vec<_> = paths.iter().map(|p| p.scope).collect();
        assert_eq!(scopes, vec![Scope::Project, Scope::Service]);
    }

    #[test]
    fn custom_layout_keeps_its_order_and_fills_placeholders() {
        let layout = Layout::from_templates(&[
            PathTemplate {
                scope: Scope::Project,
                template: "teams/{project}/common".into(),
            },
            PathTemplate {
                scope: Scope::EnvironmentService,
                template: "teams/{project}/{environment}/{service}".into(),
            },
        ])
        .unwrap();
        let paths = layout.paths(&coords(Some("prod"), Some("web")));
        assert_eq!(paths[0].path, "teams/shop/common");
        assert_eq!(paths[1].path, "teams/shop/prod/web");
        assert_eq!(paths.len(), 2);
    }

    fn layout(templates: &[(Scope, &str)]) -> Result<Layout, NameError> {
        Layout::from_templates(
            &templates
                .iter()
                .map(|(scope, template)| PathTemplate {
                    scope: *scope,
                    template: template.to_string(),
                })
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn bad_templates_are_refused_with_the_problem_named() {
        let cases = [
            (Scope::Project, "", "is empty"),
            (Scope::Project, "/{project}", "start or end"),
            (Scope::Project, "{project}/../x", "'..'"),
            (
                Scope::Project,
                "{project}/{team}",
                "unknown placeholder {team}",
            ),
            (Scope::Project, "{project", "whole path segment"),
            (Scope::Project, "static", "must contain {project}"),
            (Scope::Service, "{project}/x", "exactly the placeholders"),
            (
                Scope::Project,
                "{project}/{environment}",
                "exactly the placeholders",
            ),
            (
                Scope::Project,
                "{project}/x/{project}",
                "uses {project} twice",
            ),
        ];
        for (scope, template, want) in cases {
            let first = (
                Scope::EnvironmentService,
                "{project}/{environment}/{service}",
            );
            let err = layout(&[first, (scope, template)]).unwrap_err().to_string();
            assert!(err.contains(want), "{template:?}: {err}");
            assert!(
                err.starts_with(&format!(
                    "spec.paths[1] (scope {scope}, template {template:?})"
                )),
                "names the entry: {err}"
            );
        }
    }

    #[test]
    fn placeholders_that_share_a_segment_are_refused() {
        // `shop-a` + `b`, or `shop` + `a-b`: two coordinates, one path.
        for template in [
            "{project}-{service}",
            "{project}/svc-{service}",
            "{project}/{service}.conf",
            "teams/{project}{service}",
        ] {
            let err = layout(&[(Scope::Service, template)])
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("spec.paths[0] (scope service")
                    && err.contains("a placeholder must be a whole path segment"),
                "{template:?}: {err}"
            );
        }
    }

    #[test]
    fn templates_of_two_scopes_that_can_name_one_path_are_refused() {
        let cases = [
            // Same shape: `shop/api` is service api and environment api.
            (
                [
                    (Scope::Service, "{project}/{service}"),
                    (Scope::Environment, "{project}/{environment}"),
                ],
                "x/x",
            ),
            // A fixed segment a placeholder can take: project `envs`, service `x`.
            (
                [
                    (Scope::Project, "envs/{project}"),
                    (Scope::Service, "{project}/{service}"),
                ],
                "envs/x",
            ),
            // Placeholders in another order.
            (
                [
                    (Scope::Service, "{project}/{service}"),
                    (Scope::Environment, "{environment}/{project}"),
                ],
                "x/x",
            ),
        ];
        for (templates, example) in cases {
            let err = layout(&templates).unwrap_err();
            assert!(
                matches!(&err, NameError::Overlap { first: 0, second: 1, example: e, .. } if e == example),
                "{templates:?}: {err}"
            );
            let text = err.to_string();
            assert!(
                text.starts_with("spec.paths[0]") && text.contains("and spec.paths[1]"),
                "{text}"
            );
        }
    }

    #[test]
    fn templates_told_apart_by_a_fixed_segment_or_their_length_are_accepted() {
        layout(&[
            (Scope::Project, "{project}"),
            (Scope::Service, "{project}/svc/{service}"),
            (Scope::Environment, "{project}/env/{environment}"),
            (
                Scope::EnvironmentService,
                "{project}/env/{environment}/{service}",
            ),
        ])
        .unwrap();
        // Environment `svc` would make `{project}/{environment}/{service}` a service path.
        assert!(matches!(
            layout(&[
                (Scope::Service, "{project}/svc/{service}"),
                (Scope::EnvironmentService, "{project}/{environment}/{service}"),
            ]),
            Err(NameError::Overlap { example, .. }) if example == "x/svc/x"
        ));
        // A fixed segment that is no valid name cannot be taken by a placeholder.
        layout(&[
            (Scope::Project, "{project}/@"),
            (Scope::Service, "{project}/{service}"),
        ])
        .unwrap();
        assert_eq!(
            layout(&[]).unwrap(),
            Layout::default(),
            "no templates: the default layout"
        );
        let default: Vec<_> = Scope::ALL
            .iter()
            .map(|s| (*s, s.default_template()))
            .collect();
        assert_eq!(layout(&default).unwrap(), Layout::default());
    }

    #[test]
    fn duplicate_scope_in_layout_is_refused() {
        let err = layout(&[
            (Scope::Project, "{project}"),
            (Scope::Service, "{project}/s/{service}"),
            (Scope::Project, "{project}/p"),
        ])
        .unwrap_err();
        assert_eq!(
            err,
            NameError::DuplicateScope {
                index: 2,
                first: 0,
                scope: Scope::Project
            }
        );
        assert!(
            err.to_string()
                .starts_with("spec.paths[2] names scope project again")
        );
    }

    #[test]
    fn names_with_slashes_dots_or_odd_characters_are_refused() {
        for bad in [
            "",
            "a/b",
            "..",
            "a..b",
            ".a",
            "a.",
            "a b",
            "ä",
            "a\u{7}",
            "x/../y",
            &"a".repeat(64),
        ] {
            assert!(validate_name("project", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["shop", "a.b", "A_b-9", "v1.2.3", &"a".repeat(63)] {
            assert!(validate_name("project", good).is_ok(), "{good:?} refused");
        }
    }
}
