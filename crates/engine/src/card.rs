//! The model card (`README.md`) written into every merge output, in the
//! structure of mergekit's card (`mergekit/card.py`): YAML front matter with
//! `base_model` (the hub ids among the inputs), `library_name` and `tags`;
//! a line saying how the model was made; the method with a link to its paper
//! (from the method's registered metadata, [`MethodInfo::paper`]); the base
//! and the models, hub ids linked to the hub; and the exact config text in a
//! YAML block.
//!
//! The card replaces nothing: a template model's own `README.md` describes
//! that model, not the merge, and is never copied into the output (it is not
//! among [`SUPPORT_FILES`](tensormerge_io::SUPPORT_FILES)); like mergekit we
//! write our own. `tensormerge merge --no-card` (or [`Plan::card`](crate::Plan::card)
//! set to `None`) writes none.
//!
//! ```
//! use tensormerge_engine::card::{ModelCard, arxiv_ids};
//! assert_eq!(arxiv_ids("Yu et al. 2024, arXiv:2311.03099; Yadav et al. 2023, arXiv:2306.01708"),
//!            vec!["2311.03099", "2306.01708"]);
//! let card = ModelCard::new(
//!     "ties",
//!     "Yadav et al. 2023, arXiv:2306.01708",
//!     Some("org/base"),
//!     &["./legal".to_string(), "org/recipe".to_string()],
//!     Some("merge_method: ties\n"),
//! );
//! let text = card.render("merged");
//! assert!(text.starts_with("---\nbase_model:\n- org/base\n- org/recipe\n"));
//! assert!(text.contains("[ties](https://arxiv.org/abs/2306.01708)"));
//! assert!(text.contains("* ./legal\n* [org/recipe](https://huggingface.co/org/recipe)\n"));
//! assert!(text.contains("```yaml\nmerge_method: ties\n```"));
//! ```

use std::path::Path;

use tensormerge_io::HubId;
use tensormerge_methods::{BaseModel, MergeMethod, MethodInfo};

use crate::config::MergeConfig;
use crate::error::EngineError;

/// A model card, rendered with the output's name by [`ModelCard::render`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelCard {
    /// The method's name.
    pub method: String,
    /// The method's paper (as registered: `Authors year, arXiv:ID`).
    pub paper: String,
    /// The base model, when the method merges relative to one.
    pub base: Option<String>,
    /// The other models, in config order, each once.
    pub models: Vec<String>,
    /// The config text, verbatim.
    pub config: Option<String>,
    /// For `tensormerge eval`: the command line (expression and models),
    /// shown instead of the method and the config.
    pub command: Option<String>,
}

/// The arXiv ids in a paper reference (`arXiv:2306.01708` → `2306.01708`).
pub fn arxiv_ids(paper: &str) -> Vec<&str> {
    paper
        .match_indices("arXiv:")
        .filter_map(|(i, m)| {
            let rest = &paper[i + m.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'v'))
                .unwrap_or(rest.len());
            let id = rest[..end].trim_end_matches('.');
            (!id.is_empty()).then_some(id)
        })
        .collect()
}

/// The hub repository a reference names, when it is a hub id and not a
/// local path (`org/name@rev` → `org/name`).
fn hub_repo(reference: &str) -> Option<String> {
    if Path::new(reference).exists() {
        return None;
    }
    HubId::parse(reference).ok().map(|id| id.repo)
}

fn link(reference: &str) -> String {
    match hub_repo(reference) {
        Some(repo) => format!("[{reference}](https://huggingface.co/{repo})"),
        None => reference.to_string(),
    }
}

/// A YAML scalar: plain when it is safe to write so, else a JSON string
/// (valid YAML).
fn yaml_scalar(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_' | '.'))
        && !s.starts_with(['-', '.']);
    if plain {
        s.to_string()
    } else {
        serde_json::Value::from(s).to_string()
    }
}

impl ModelCard {
    /// A card for a merge by `method` (paper reference `paper`) of `models`
    /// relative to `base`, made from `config`.
    pub fn new(
        method: &str,
        paper: &str,
        base: Option<&str>,
        models: &[String],
        config: Option<&str>,
    ) -> ModelCard {
        let mut list: Vec<String> = Vec::new();
        for m in models {
            if Some(m.as_str()) != base && !list.contains(m) {
                list.push(m.clone());
            }
        }
        ModelCard {
            method: method.to_string(),
            paper: paper.to_string(),
            base: base.map(str::to_string),
            models: list,
            config: config.map(str::to_string),
            command: None,
        }
    }

    /// A card for the output of `tensormerge eval EXPR` over `models`
    /// (`(name, reference)` pairs, as given with `--model`).
    ///
    /// ```
    /// use tensormerge_engine::card::ModelCard;
    /// let card = ModelCard::for_expression("a + 0.5 * (b - a)", &[("a".into(), "./x".into()), ("b".into(), "org/y".into())]);
    /// let text = card.render("out");
    /// assert!(text.contains("tensormerge eval 'a + 0.5 * (b - a)' --model a=./x --model b=org/y"));
    /// assert!(text.contains("* [org/y](https://huggingface.co/org/y)"));
    /// ```
    pub fn for_expression(expr: &str, models: &[(String, String)]) -> ModelCard {
        let refs: Vec<String> = models.iter().map(|(_, r)| r.clone()).collect();
        let mut card = ModelCard::new("expression", "", None, &refs, None);
        let quote = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
        let mut command = format!("tensormerge eval {}", quote(expr));
        for (n, r) in models {
            command.push_str(&format!(" --model {n}={r}"));
        }
        card.command = Some(command);
        card
    }

    /// The card as Markdown, titled `name`.
    pub fn render(&self, name: &str) -> String {
        let mut hub: Vec<String> = Vec::new();
        for r in self.base.iter().chain(&self.models) {
            if let Some(repo) = hub_repo(r)
                && !hub.contains(&repo)
            {
                hub.push(repo);
            }
        }
        let mut out = String::from("---\n");
        if hub.is_empty() {
            out.push_str("base_model: []\n");
        } else {
            out.push_str("base_model:\n");
            for h in &hub {
                out.push_str(&format!("- {}\n", yaml_scalar(h)));
            }
        }
        out.push_str(
            "library_name: transformers\ntags:\n- mergekit\n- merge\n- tensormerge\n---\n",
        );
        out.push_str(&format!("# {name}\n\n"));
        out.push_str(&format!(
            "This is a merge of pre-trained language models created using tensormerge {} (configured as for [mergekit](https://github.com/arcee-ai/mergekit)).\n\n",
            env!("CARGO_PKG_VERSION")
        ));
        out.push_str("## Merge Details\n### Merge Method\n\n");
        if let Some(cmd) = &self.command {
            out.push_str("This model was computed tensor by tensor from the expression in the command below (tensor arithmetic on the models it names).\n\n");
            out.push_str("### Models Merged\n\nThe following models were included in the merge:\n");
            for m in &self.models {
                out.push_str(&format!("* {}\n", link(m)));
            }
            out.push_str(&format!(
                "\n### Configuration\n\nThe following command was used to produce this model:\n\n```sh\n{cmd}\n```\n"
            ));
            return out;
        }
        let ids = arxiv_ids(&self.paper);
        let method = match ids.first() {
            Some(id) => format!("[{}](https://arxiv.org/abs/{id})", self.method),
            None => self.method.clone(),
        };
        let base = match &self.base {
            Some(b) => format!(" using {} as a base", link(b)),
            None => String::new(),
        };
        out.push_str(&format!(
            "This model was merged using the {method} merge method{base}.\n\n"
        ));
        let mut paper = self.paper.clone();
        for id in &ids {
            paper = paper.replace(
                &format!("arXiv:{id}"),
                &format!("[arXiv:{id}](https://arxiv.org/abs/{id})"),
            );
        }
        out.push_str(&format!("Reference: {paper}.\n\n"));
        out.push_str("### Models Merged\n\nThe following models were included in the merge:\n");
        for m in &self.models {
            out.push_str(&format!("* {}\n", link(m)));
        }
        if let Some(c) = &self.config {
            out.push_str(
                "\n### Configuration\n\nThe following YAML configuration was used to produce this model:\n\n```yaml\n",
            );
            out.push_str(c);
            if !c.ends_with('\n') {
                out.push('\n');
            }
            out.push_str("```\n");
        }
        out
    }
}

/// The card of a merge given by `config` and run by `method`: every model
/// the config references (models, slice sources, the base), the base named
/// as such when the method merges relative to it.
pub(crate) fn model_card(config: &MergeConfig, method: &dyn MergeMethod) -> Option<ModelCard> {
    let info: &MethodInfo = method.info();
    let mut models: Vec<String> = config
        .models
        .iter()
        .map(|m| m.model.reference.clone())
        .collect();
    for s in &config.slices {
        models.extend(s.sources.iter().map(|x| x.model.reference.clone()));
    }
    let mut base = config.base_model.as_ref().map(|b| b.reference.clone());
    if info.base == BaseModel::Unused {
        models.extend(base.take());
    }
    Some(ModelCard::new(
        info.name,
        info.paper,
        base.as_deref(),
        &models,
        config.text.as_deref(),
    ))
}

/// Writes the card as `README.md` into the (temporary) output directory
/// `dir`, titled `name`.
pub(crate) fn write(dir: &Path, card: &ModelCard, name: &str) -> Result<(), EngineError> {
    let path = dir.join("README.md");
    std::fs::write(&path, card.render(name)).map_err(|e| {
        EngineError::io(
            "cannot write the model card",
            tensormerge_io::IoError::Io { path, source: e },
        )
    })
}
