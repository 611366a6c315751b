//! The second stage of the settings: the departments and priorities of one
//! configuration as typed ids, built once when the file is loaded, so every
//! stage reads the same catalog instead of re-reading the file's strings.

use super::file::Config;
use super::routing::DefaultsConfig;
use crate::domain::{Action, DepartmentId, PriorityId};

/// One configured department.
#[derive(Debug, Clone, PartialEq)]
pub struct Department {
    pub id: DepartmentId,
    pub mailbox: Option<String>,
    pub action: Action,
    /// What the cold-start classifier compares a message with.
    pub description: String,
    pub examples: Vec<String>,
    /// Head labels that mean this department.
    pub labels: Vec<String>,
}

/// The departments and priorities mail can be routed to.
#[derive(Debug, Clone, PartialEq)]
pub struct Catalog {
    departments: Vec<Department>,
    default_department: DepartmentId,
    priorities: Vec<PriorityId>,
    default_priority: PriorityId,
}

/// The catalog of a file with no departments and the default `[defaults]`.
impl Default for Catalog {
    fn default() -> Self {
        let d = DefaultsConfig::default();
        Catalog {
            departments: Vec::new(),
            default_department: DepartmentId::new(d.department),
            priorities: d.priorities.into_iter().map(PriorityId::new).collect(),
            default_priority: PriorityId::new(d.priority),
        }
    }
}

impl Catalog {
    /// Built from a validated file (names unique, references resolved).
    pub fn new(cfg: &Config) -> Catalog {
        Catalog {
            departments: cfg
                .departments
                .iter()
                .map(|d| Department {
                    id: DepartmentId::new(&d.name),
                    mailbox: d.mailbox.clone(),
                    action: d.action,
                    description: d.description.clone(),
                    examples: d.examples.clone(),
                    labels: d.labels.clone(),
                })
                .collect(),
            default_department: DepartmentId::new(&cfg.defaults.department),
            priorities: cfg.defaults.priorities.iter().map(PriorityId::new).collect(),
            default_priority: PriorityId::new(&cfg.defaults.priority),
        }
    }

    pub fn departments(&self) -> &[Department] {
        &self.departments
    }

    /// The department named `name` (exactly).
    pub fn department(&self, name: &str) -> Option<&Department> {
        self.departments.iter().find(|d| d.id == name)
    }

    /// The department named `name`, ignoring case (what staff type).
    pub fn department_ignoring_case(&self, name: &str) -> Option<&Department> {
        self.departments.iter().find(|d| d.id.as_str().eq_ignore_ascii_case(name))
    }

    /// The department a head label means: one that lists it in `labels`, or
    /// one named like it, or the default department by name.
    pub fn for_label(&self, label: &str) -> Option<&DepartmentId> {
        self.departments
            .iter()
            .find(|d| d.labels.iter().any(|l| l == label))
            .or_else(|| self.department(label))
            .map(|d| &d.id)
            .or((self.default_department == label).then_some(&self.default_department))
    }

    pub fn default_department(&self) -> &DepartmentId {
        &self.default_department
    }

    pub fn priorities(&self) -> &[PriorityId] {
        &self.priorities
    }

    pub fn default_priority(&self) -> &PriorityId {
        &self.default_priority
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_map_to_departments_and_names_to_ids() {
        let cfg = Config::from_toml(
            "[defaults]\ndepartment = \"general\"\n\
             [[departments]]\nname = \"billing\"\nmailbox = \"b@example.com\"\naction = \"reroute\"\nlabels = [\"Billing and Payments\"]\n",
            "t",
        )
        .unwrap();
        let c = &cfg.catalog;
        assert_eq!(c.for_label("Billing and Payments"), Some(&DepartmentId::new("billing")));
        assert_eq!(c.for_label("billing"), Some(&DepartmentId::new("billing")));
        assert_eq!(c.for_label("general"), Some(&DepartmentId::new("general")));
        assert_eq!(c.for_label("Sales"), None);
        assert_eq!(c.department_ignoring_case("BILLING").map(|d| d.action), Some(Action::Reroute));
        assert_eq!(c.default_priority(), &PriorityId::new("medium"));
        // A Config made in code (not loaded) has the catalog of the default [defaults].
        assert_eq!(Config::default().catalog, Catalog::new(&Config::default()));
    }
}
