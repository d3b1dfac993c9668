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
    #[error("path template {template:?} for scope {scope}: {problem}")]
    Template {
        scope: Scope,
        template: String,
        problem: String,
    },
    #[error("path layout names scope {0} twice")]
    DuplicateScope(Scope),
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
    pub fn from_templates(templates: &[PathTemplate]) -> Result<Self, NameError> {
        if templates.is_empty() {
            return Ok(Layout::default());
        }
        let mut entries: Vec<(Scope, String)> = Vec::with_capacity(templates.len());
        for t in templates {
            if entries.iter().any(|(s, _)| *s == t.scope) {
                return Err(NameError::DuplicateScope(t.scope));
            }
            check_template(t.scope, &t.template)?;
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

fn check_template(scope: Scope, template: &str) -> Result<(), NameError> {
    let err = |problem: &str| NameError::Template {
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
    if template
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(err("has an empty, '.' or '..' segment"));
    }
    // Every `{...}` must be a known placeholder.
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or_else(|| err("has an unclosed '{'"))?;
        let name = &after[..close];
        if !PLACEHOLDERS.contains(&name) {
            return Err(err(&format!(
                "has unknown placeholder {{{name}}}; use {{project}}, {{environment}} or {{service}}"
            )));
        }
        rest = &after[close + 1..];
    }
    if rest.contains('}') || template.matches('}').count() != template.matches('{').count() {
        return Err(err("has an unmatched '}'"));
    }
    if !template.contains("{project}") {
        return Err(err(
            "must contain {project}, or projects would share values",
        ));
    }
    let needs = |p: &str| template.contains(p);
    let expected_env = matches!(scope, Scope::Environment | Scope::EnvironmentService);
    let expected_svc = matches!(scope, Scope::Service | Scope::EnvironmentService);
    if needs("{environment}") != expected_env || needs("{service}") != expected_svc {
        return Err(err(&format!(
            "scope {scope} must use exactly the placeholders of its scope ({})",
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
            (Scope::Project, "{project", "unclosed"),
            (Scope::Project, "static", "must contain {project}"),
            (Scope::Service, "{project}/x", "exactly the placeholders"),
            (
                Scope::Project,
                "{project}/{environment}",
                "exactly the placeholders",
            ),
        ];
        for (scope, template, want) in cases {
            let err = Layout::from_templates(&[PathTemplate {
                scope,
                template: template.into(),
            }])
            .unwrap_err()
            .to_string();
            assert!(err.contains(want), "{template:?}: {err}");
        }
    }

    #[test]
    fn duplicate_scope_in_layout_is_refused() {
        let t = PathTemplate {
            scope: Scope::Project,
            template: "{project}".into(),
        };
        assert_eq!(
            Layout::from_templates(&[t.clone(), t]),
            Err(NameError::DuplicateScope(Scope::Project))
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
