//! The method registry: every [`MergeMethod`] linked into the binary.

use std::sync::OnceLock;

use crate::{MergeMethod, MethodError};

/// One registered method. Created by [`register_method!`](crate::register_method).
#[derive(Clone, Copy)]
pub struct Registration {
    method: &'static dyn MergeMethod,
    crate_name: &'static str,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("method", &self.method.info().name)
            .field("crate_name", &self.crate_name)
            .finish()
    }
}

impl Registration {
    /// A registration of `method` by the crate `crate_name`.
    pub const fn new(method: &'static dyn MergeMethod, crate_name: &'static str) -> Self {
        Registration { method, crate_name }
    }

    /// The method.
    pub fn method(&self) -> &'static dyn MergeMethod {
        self.method
    }

    /// The crate that registered it.
    pub fn crate_name(&self) -> &'static str {
        self.crate_name
    }
}

inventory::collect!(Registration);

/// Registers a method with the global registry.
///
/// The argument is a constant expression of a type implementing
/// [`MergeMethod`] (usually a unit struct). The method crate does not depend on
/// `inventory` itself. A binary only sees methods of crates it links: reference
/// each method crate (`use tensormerge_method_ties as _;`).
///
/// ```
/// use tensormerge_methods::*;
/// struct KeepBase;
/// static INFO: MethodInfo = MethodInfo {
///     name: "keep_base_doc_example",
///     summary: "returns the base",
///     paper: "none",
///     base: BaseModel::Required,
///     min_models: 0,
///     max_models: None,
///     params: &[],
/// };
/// impl MergeMethod for KeepBase {
///     fn info(&self) -> &'static MethodInfo { &INFO }
///     fn merge(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<(), MethodError> {
///         out.copy_from_slice(chunk.base.expect("base is required"));
///         Ok(())
///     }
/// }
/// register_method!(KeepBase);
///
/// assert!(registry().get("keep-base-doc-example").is_ok());
/// ```
#[macro_export]
macro_rules! register_method {
    ($method:expr) => {
        $crate::__private::inventory::submit! {
            $crate::Registration::new(&$method, env!("CARGO_PKG_NAME"))
        }
    };
}

/// All registered methods, sorted by name.
#[derive(Debug)]
pub struct Registry {
    entries: Vec<Registration>,
}

/// The global registry, built on first use from every linked registration.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let mut entries: Vec<Registration> = inventory::iter::<Registration>
            .into_iter()
            .copied()
            .collect();
        entries.sort_by(|a, b| {
            (a.method.info().name, a.crate_name).cmp(&(b.method.info().name, b.crate_name))
        });
        Registry { entries }
    })
}

/// Canonical spelling of a method name: kebab-case and case are folded to
/// mergekit's snake_case.
pub fn canonical_name(name: &str) -> String {
    name.trim().to_ascii_lowercase().replace('-', "_")
}

impl Registry {
    /// Every registration, sorted by method name (duplicates included).
    pub fn registrations(&self) -> &[Registration] {
        &self.entries
    }

    /// The registered methods, sorted by name (the first of any duplicates).
    pub fn methods(&self) -> impl Iterator<Item = &'static dyn MergeMethod> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter(|(i, r)| {
                *i == 0 || self.entries[i - 1].method.info().name != r.method.info().name
            })
            .map(|(_, r)| r.method)
    }

    /// Method names, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.methods().map(|m| m.info().name).collect()
    }

    /// `Err` naming both crates when any name is registered twice.
    pub fn check(&self) -> Result<(), MethodError> {
        for w in self.entries.windows(2) {
            if w[0].method.info().name == w[1].method.info().name {
                return Err(duplicate(&w[0], &w[1]));
            }
        }
        Ok(())
    }

    /// The method called `name` (snake_case or kebab-case). An unknown name
    /// gets the closest registered names as suggestions; a name registered by
    /// two crates is an error naming both.
    pub fn get(&self, name: &str) -> Result<&'static dyn MergeMethod, MethodError> {
        let want = canonical_name(name);
        let found: Vec<&Registration> = self
            .entries
            .iter()
            .filter(|r| r.method.info().name == want)
            .collect();
        match found.as_slice() {
            [one] => Ok(one.method),
            [a, b, ..] => Err(duplicate(a, b)),
            [] => Err(MethodError::UnknownMethod {
                name: name.to_string(),
                suggestions: suggestions(&want, &self.names()),
            }),
        }
    }
}

fn duplicate(a: &Registration, b: &Registration) -> MethodError {
    MethodError::DuplicateMethod {
        name: a.method.info().name.to_string(),
        first_crate: a.crate_name.to_string(),
        second_crate: b.crate_name.to_string(),
    }
}

/// Names within a small edit distance of `want`, or containing it, closest first.
pub fn suggestions(want: &str, names: &[&str]) -> Vec<String> {
    let mut scored: Vec<(usize, &str)> = names
        .iter()
        .map(|n| (edit_distance(want, n), *n))
        .filter(|(d, n)| *d <= 2.max(want.len() / 3) || (want.len() >= 3 && n.contains(want)))
        .collect();
    scored.sort();
    scored
        .into_iter()
        .take(3)
        .map(|(_, n)| n.to_string())
        .collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_find_typos() {
        let names = [
            "dare_linear",
            "dare_ties",
            "linear",
            "task_arithmetic",
            "ties",
        ];
        assert_eq!(suggestions("tie", &names)[0], "ties");
        assert_eq!(
            suggestions("task_arithmatic", &names),
            vec!["task_arithmetic"]
        );
        assert!(suggestions("zzzzzzzz", &names).is_empty());
        assert_eq!(canonical_name("Dare-Ties"), "dare_ties");
    }
}
