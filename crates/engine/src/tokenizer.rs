//! Output vocabularies: `tokenizer_source`, the `tokenizer:` section and
//! `chat_template`, with mergekit's meaning.
//!
//! ```yaml
//! tokenizer_source: union          # or `base`, or one of the models
//! # or, mergekit's newer form (not together with `tokenizer_source`):
//! tokenizer:
//!   source: union                  # default `union`
//!   tokens:
//!     <|im_start|>:
//!       source: ./chat             # that model's row for this token
//!       force: true                # every model takes it, even those that have the token
//!     <pad>:
//!       source: {kind: zero}
//!     <sep>:
//!       source: {kind: model_token, model: ./a, token: "</s>"}   # or token_id: 2
//!   pad_to_multiple_of: 64
//! chat_template: chatml             # chatml, llama3, alpaca, mistral, auto, or Jinja text
//! ```
//!
//! # Meaning (mergekit's `mergekit/tokenizer/build.py` and `embed.py`)
//!
//! * **The output vocabulary.** `base`: the base model's tokenizer (the first
//!   model's when there is no base); a model: that model's; `union`: the
//!   base's tokenizer, then every token of the other models that it lacks,
//!   then the added tokens (special tokens) of every model, first settings
//!   winning (mergekit's `build_union_tokenizer`). mergekit walks each
//!   vocabulary in Python dict order; we walk the inputs in config order
//!   (base, then `models`) and each vocabulary by token id, so the order is
//!   fixed. Tokens whose id is at or past a model's embedding rows are not in
//!   that model (mergekit's `get_stripped_tokenizer`). The keys of `tokens`
//!   are added to the output vocabulary when missing. The output tokenizer is
//!   the source tokenizer (read through the `tokenizers` crate) with the new
//!   tokens added as added tokens, as mergekit's `add_tokens` does.
//! * **Embedding rows** (`model.embed_tokens.weight`, `lm_head.weight`,
//!   GPT-2's `wte.weight`, BERT's `embeddings.word_embeddings.weight`): each
//!   input's matrix is permuted by token string into the output vocabulary,
//!   then the permuted matrices are merged by the config's own method with
//!   its parameters (mergekit's `PermutedEmbeddings` feeds the normal merge
//!   task). A model's row for an output token is its own row when it has
//!   the token (unless the token is configured with `force: true`);
//!   otherwise the token's default row (`assign_embedding_sources`): the row
//!   configured under `tokens`; else, when exactly one input has the token,
//!   that input's row; when none has it, zeros; when the base has it, the
//!   base's row; otherwise the average of the rows of the inputs that have
//!   it (summed in config order, in `f32`). The inputs are the base (also
//!   when the method does not merge it) and the models.
//! * **`pad_to_multiple_of`** rounds the number of rows up; each padding row
//!   of a model's permuted matrix is the mean of its real rows (mergekit,
//!   after <https://nlp.stanford.edu/~johnhew/vocab-expansion.html>; summed
//!   in `f64`), so the merged padding rows are the merge of those means.
//!   The output `config.json` gets the new `vocab_size`.
//! * **`chat_template`**: a name (`chatml`, `llama3`, `alpaca`, `mistral`:
//!   our own text of those standard formats, as mergekit ships them), `auto`
//!   (the template most of the inputs' `tokenizer_config.json` carry), or
//!   the Jinja text itself (at least 20 characters with a `{`, mergekit's
//!   rule), written into the output's `tokenizer_config.json`.
//! * Without `tokenizer_source`/`tokenizer`, models whose vocabularies differ
//!   (their `tokenizer.json` vocabularies, or the row counts of their
//!   embeddings) are refused: mergekit would merge the rows by id, which
//!   mixes unrelated tokens.
//!
//! Where we differ: a `tokens` entry without `source` is refused (mergekit
//! fails on it at merge time); `model:PATH` is not a form mergekit accepts
//! (a model reference is a path or hub id), so neither do we; mergekit's
//! `exaone` template is not shipped; vocabulary merging (`union`, the
//! `tokenizer:` section) is not supported with `slices` (refused), and
//! `slices` inputs are not checked for differing vocabularies. BERT's MLM
//! decoder (`cls.predictions.decoder.*`) is not remapped.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokenizers::{AddedToken, Tokenizer};

use crate::config::{ModelRef, TokenizerSource, join, key_of, map_of, model_ref, str_of};
use crate::error::{ConfigError, EngineError};
use crate::plan::Input;
use crate::yaml::{Node, Pos, Value};

/// The `tokenizer:` section (or `tokenizer_source`, which is the section
/// with only `source`).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizerSpec {
    /// Where the vocabulary comes from.
    pub source: TokenizerSource,
    /// Per-token settings, in config order.
    pub tokens: Vec<TokenSetting>,
    /// Round the vocabulary up to a multiple of this.
    pub pad_to_multiple_of: Option<usize>,
}

/// One entry of `tokenizer.tokens`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenSetting {
    /// The token string.
    pub token: String,
    /// Where its row comes from.
    pub source: RowSource,
    /// Every model takes that row, even those that have the token.
    pub force: bool,
    /// Key path in the config.
    pub path: String,
    /// Where it was written.
    pub pos: Pos,
}

/// Where a configured token's row comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum RowSource {
    /// `{kind: zero}`: zeros.
    Zero,
    /// A model: its row for the same token.
    Model(ModelRef),
    /// `{kind: model_token, model, token | token_id}`: a row of a model by
    /// its own token string or id.
    ModelToken {
        /// The model.
        model: ModelRef,
        /// Its token id, or `None` when given by string.
        token_id: Option<u32>,
        /// Its token string, when given by string.
        token: Option<String>,
    },
}

/// `chat_template` as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    /// The name or text.
    pub value: String,
    /// Where it was written.
    pub pos: Pos,
}

/// The chat template names we ship (mergekit's `_data/chat_templates`),
/// each with our own text of the standard format.
pub const CHAT_TEMPLATES: &[(&str, &str)] = &[
    (
        "chatml",
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    ),
    (
        "llama3",
        "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    ),
    (
        "alpaca",
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] | trim }}\n\n{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] | trim }}\n\n{% elif message['role'] == 'user_context' %}### Input:\n{{ message['content'] | trim }}\n\n{% elif message['role'] == 'assistant' %}### Response:\n{{ message['content'] | trim }}\n\n{% endif %}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}### Response:\n{% endif %}",
    ),
    (
        "mistral",
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set rest = messages[1:] %}{% else %}{% set rest = messages %}{% endif %}{% for message in rest %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate user/assistant after an optional system message') }}{% endif %}{% if message['role'] == 'user' %}{% if loop.first and system is defined %}{{ ' [INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}{% else %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% endif %}{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}",
    ),
];

pub(crate) fn parse_source(node: &Node, path: &str) -> Result<TokenizerSource, ConfigError> {
    let s = str_of(node, path, "`base`, `union` or a model reference")?;
    Ok(match s.trim() {
        "base" => TokenizerSource::Base,
        "union" => TokenizerSource::Union,
        _ => TokenizerSource::Model(model_ref(node, path)?),
    })
}

/// Parses the `tokenizer:` section.
pub(crate) fn parse_section(node: &Node, path: &str) -> Result<TokenizerSpec, ConfigError> {
    let mut spec = TokenizerSpec {
        source: TokenizerSource::Union,
        tokens: Vec::new(),
        pad_to_multiple_of: None,
    };
    for (k, v) in map_of(node, path)? {
        let key = key_of(k, path)?;
        let p = join(path, &key);
        match key.as_str() {
            "source" => spec.source = parse_source(v, &p)?,
            "pad_to_multiple_of" => match v.value {
                Value::Int(i) if i > 0 => spec.pad_to_multiple_of = Some(i as usize),
                Value::Null => {}
                _ => {
                    return Err(ConfigError::WrongType {
                        path: p,
                        pos: v.pos,
                        expected: "an integer ≥ 1".into(),
                        got: v.describe(),
                    });
                }
            },
            "tokens" => {
                if matches!(v.value, Value::Null) {
                    continue;
                }
                for (tk, tv) in map_of(v, &p)? {
                    let token = key_of(tk, &p)?;
                    let tp = format!("{p}.{token}");
                    spec.tokens.push(token_setting(token, tv, &tp, tk.pos)?);
                }
            }
            _ => {
                return Err(crate::config::unknown_key(
                    path,
                    &key,
                    k.pos,
                    &["source", "tokens", "pad_to_multiple_of"],
                ));
            }
        }
    }
    Ok(spec)
}

fn token_setting(
    token: String,
    node: &Node,
    path: &str,
    pos: Pos,
) -> Result<TokenSetting, ConfigError> {
    let mut source = None;
    let mut force = false;
    for (k, v) in map_of(node, path)? {
        let key = key_of(k, path)?;
        let p = join(path, &key);
        match key.as_str() {
            "force" => {
                force = match v.value {
                    Value::Bool(b) => b,
                    _ => {
                        return Err(ConfigError::WrongType {
                            path: p,
                            pos: v.pos,
                            expected: "true or false".into(),
                            got: v.describe(),
                        });
                    }
                }
            }
            "source" => source = Some(row_source(v, &p)?),
            _ => {
                return Err(crate::config::unknown_key(
                    path,
                    &key,
                    k.pos,
                    &["source", "force"],
                ));
            }
        }
    }
    let source = source.ok_or_else(|| ConfigError::Invalid {
        path: path.to_string(),
        pos,
        message: format!(
            "token `{token}` needs a `source`: a model, `{{kind: zero}}` or `{{kind: model_token, model: M, token: T}}`"
        ),
    })?;
    Ok(TokenSetting {
        token,
        source,
        force,
        path: path.to_string(),
        pos,
    })
}

fn row_source(node: &Node, path: &str) -> Result<RowSource, ConfigError> {
    if let Value::Str(_) = node.value {
        return Ok(RowSource::Model(model_ref(node, path)?));
    }
    let map = map_of(node, path)?;
    let mut kind = None;
    let mut model = None;
    let mut token_id = None;
    let mut token = None;
    for (k, v) in map {
        let key = key_of(k, path)?;
        let p = join(path, &key);
        match key.as_str() {
            "kind" => kind = Some((str_of(v, &p, "`zero` or `model_token`")?, v.pos)),
            "model" => model = Some(model_ref(v, &p)?),
            "token" => token = Some(str_of(v, &p, "a token string")?),
            "token_id" => match v.value {
                Value::Int(i) if i >= 0 && i <= u32::MAX as i64 => token_id = Some(i as u32),
                _ => {
                    return Err(ConfigError::WrongType {
                        path: p,
                        pos: v.pos,
                        expected: "a token id (an integer ≥ 0)".into(),
                        got: v.describe(),
                    });
                }
            },
            _ => {
                return Err(crate::config::unknown_key(
                    path,
                    &key,
                    k.pos,
                    &["kind", "model", "token", "token_id"],
                ));
            }
        }
    }
    let invalid = |message: String| ConfigError::Invalid {
        path: path.to_string(),
        pos: node.pos,
        message,
    };
    match kind {
        Some((k, _)) if k == "zero" => Ok(RowSource::Zero),
        Some((k, _)) if k == "model_token" => {
            let model = model.ok_or_else(|| ConfigError::Missing {
                path: join(path, "model"),
                pos: node.pos,
            })?;
            if token.is_some() == token_id.is_some() {
                return Err(invalid("give exactly one of `token` and `token_id`".into()));
            }
            Ok(RowSource::ModelToken {
                model,
                token_id,
                token,
            })
        }
        Some((k, _)) => Err(invalid(format!(
            "unknown kind `{k}` (expected `zero` or `model_token`)"
        ))),
        None => Err(ConfigError::Missing {
            path: join(path, "kind"),
            pos: node.pos,
        }),
    }
}

/// Parses `chat_template`.
pub(crate) fn parse_chat_template(node: &Node, path: &str) -> Result<ChatTemplate, ConfigError> {
    let s = str_of(node, path, "a template name or Jinja text")?;
    let known = CHAT_TEMPLATES.iter().any(|(n, _)| *n == s) || s == "auto";
    if !known && (s.chars().count() < 20 || !s.contains('{')) {
        return Err(ConfigError::Invalid {
            path: path.to_string(),
            pos: node.pos,
            message: format!(
                "`{s}` is neither a known template ({}, auto) nor Jinja text (at least 20 characters with a `{{`)",
                CHAT_TEMPLATES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    Ok(ChatTemplate {
        value: s,
        pos: node.pos,
    })
}

/// Whether `name` is an embedding or output-head matrix whose rows are
/// tokens.
pub fn is_embedding(name: &str) -> bool {
    const NAMES: &[&str] = &[
        "embed_tokens.weight",
        "lm_head.weight",
        "wte.weight",
        "word_embeddings.weight",
    ];
    NAMES
        .iter()
        .any(|n| name == *n || name.strip_suffix(n).is_some_and(|p| p.ends_with('.')))
}

/// The vocabulary of one input: token → id, limited to ids below its
/// embedding rows.
#[derive(Debug, Clone)]
pub(crate) struct InputVocab {
    pub(crate) map: HashMap<String, u32>,
    pub(crate) tokenizer: Option<Tokenizer>,
}

fn tokenizer_error(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Reads `dir/tokenizer.json`, if there is one.
pub(crate) fn read_tokenizer(dir: &Path) -> Result<Option<Tokenizer>, EngineError> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Ok(None);
    }
    Tokenizer::from_file(&path)
        .map(Some)
        .map_err(|e| tokenizer_error(&path, e))
}

/// The embedding rows of an input (its first embedding tensor's first
/// dimension).
pub(crate) fn embedding_rows(input: &Input) -> Option<usize> {
    input
        .model
        .layout()
        .tensors()
        .iter()
        .find(|t| is_embedding(&t.name) && t.shape.len() == 2)
        .map(|t| t.shape[0])
}

fn input_vocab(input: &Input) -> Result<InputVocab, EngineError> {
    let tokenizer = read_tokenizer(input.model.dir())?;
    let rows = embedding_rows(input).unwrap_or(usize::MAX);
    let map = tokenizer
        .as_ref()
        .map(|t| {
            t.get_vocab(true)
                .into_iter()
                .filter(|(_, id)| (*id as usize) < rows)
                .collect()
        })
        .unwrap_or_default();
    Ok(InputVocab { map, tokenizer })
}

/// Where one output row of one input's permuted matrix comes from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Row {
    /// Row `row` of input `input`.
    Of { input: usize, row: u32 },
    /// The mean of these rows (input, row), summed in order.
    Mean(Vec<(usize, u32)>),
    /// Zeros.
    Zero,
    /// A padding row: the mean of this input's real permuted rows.
    Pad,
}

/// Padding-row means by (tensor, input).
type PadMeans = HashMap<(String, usize), Arc<Vec<f32>>>;

/// Reads elements of input `i`'s own tensor into a buffer; returns the
/// bytes read.
pub(crate) type ReadRows<'a> =
    &'a dyn Fn(usize, std::ops::Range<usize>, &mut Vec<f32>) -> Result<u64, EngineError>;

/// The output vocabulary and how each input's embedding rows map into it.
#[derive(Debug)]
pub struct TokenizerPlan {
    /// The output tokenizer.
    pub(crate) tokenizer: Tokenizer,
    /// The source the tokenizer files were derived from (for the other
    /// tokenizer files: `tokenizer_config.json`, `special_tokens_map.json`).
    pub(crate) files_dir: PathBuf,
    /// Tokens in the output vocabulary (before padding).
    pub vocab_len: usize,
    /// Rows of the output embedding (after padding).
    pub rows: usize,
    /// Where the vocabulary came from, for `--dry-run`.
    pub description: String,
    /// The inputs whose rows are read (base first when there is one), by
    /// reference.
    pub(crate) inputs: Vec<Input>,
    /// For each input, its own row of each output token (`None`: absent).
    perm: Vec<Vec<Option<u32>>>,
    /// For each output token, its default row (used where an input lacks
    /// the token, or for every input when forced).
    defaults: Vec<Row>,
    /// Forced tokens (by output id).
    forced: HashSet<u32>,
    /// Padding rows' means, per (tensor, input), computed on first use.
    pad_means: Mutex<PadMeans>,
    /// Inputs whose permuted matrix is their own (same rows in the same
    /// order, nothing forced, no padding): read as they are.
    identity: Vec<bool>,
}

/// Opens the vocabularies of `inputs` (base first when `has_base`) and
/// builds the output vocabulary of `spec`.
pub(crate) fn build(
    spec: &TokenizerSpec,
    inputs: Vec<Input>,
    has_base: bool,
    source_input: Option<Input>,
) -> Result<TokenizerPlan, EngineError> {
    let vocabs = inputs
        .iter()
        .map(input_vocab)
        .collect::<Result<Vec<_>, _>>()?;
    let first = &inputs[0];
    let missing = |i: &Input| {
        EngineError::Tokenizer {
        path: i.model.dir().join("tokenizer.json"),
        message: "no tokenizer.json: a vocabulary can only be built from `tokenizer.json` files (convert the tokenizer with `transformers`: `AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`)".into(),
    }
    };
    let (mut tokenizer, files_dir, mut description) = match &spec.source {
        TokenizerSource::Base => (
            vocabs[0].tokenizer.clone().ok_or_else(|| missing(first))?,
            first.model.dir().to_path_buf(),
            format!(
                "{} (`{}`)",
                if has_base { "base" } else { "first model" },
                first.reference
            ),
        ),
        TokenizerSource::Model(r) => {
            let input = source_input.expect("the planner opens the tokenizer source");
            let t = read_tokenizer(input.model.dir())?.ok_or_else(|| missing(&input))?;
            (
                t,
                input.model.dir().to_path_buf(),
                format!("model `{}`", r.reference),
            )
        }
        TokenizerSource::Union => {
            // mergekit's `build_union_tokenizer`: the base's tokenizer, plus
            // the other models' plain tokens it lacks, plus every added token.
            let mut out = vocabs[0].tokenizer.clone().ok_or_else(|| missing(first))?;
            let base_vocab = out.get_vocab(true);
            let mut seen: HashSet<String> = base_vocab.keys().cloned().collect();
            let mut plain = Vec::new();
            let mut added: Vec<AddedToken> = Vec::new();
            let mut added_seen = HashSet::new();
            for (i, v) in vocabs.iter().enumerate() {
                let Some(t) = &v.tokenizer else {
                    // mergekit assumes a model without a tokenizer has the base's.
                    continue;
                };
                let decoder = t.get_added_tokens_decoder();
                let added_content: HashSet<&str> =
                    decoder.values().map(|a| a.content.as_str()).collect();
                let mut by_id: Vec<(&String, &u32)> = v.map.iter().collect();
                by_id.sort_by_key(|(_, id)| **id);
                for (tok, _) in by_id {
                    if !added_content.contains(tok.as_str()) && seen.insert(tok.clone()) {
                        plain.push(tok.clone());
                    }
                }
                let mut decoder: Vec<_> = decoder.into_iter().collect();
                decoder.sort_by_key(|(id, _)| *id);
                for (id, a) in decoder {
                    if !v.map.contains_key(&a.content) || v.map[&a.content] != id {
                        continue;
                    }
                    if added_seen.insert(a.content.clone()) {
                        added.push(a);
                    }
                }
                let _ = i;
            }
            let plain: Vec<AddedToken> = plain
                .into_iter()
                .map(|t| AddedToken::from(t, false))
                .collect();
            let path = first.model.dir().join("tokenizer.json");
            out.add_tokens(plain)
                .map_err(|e| tokenizer_error(&path, e))?;
            for a in added {
                if a.special {
                    out.add_special_tokens([a])
                } else {
                    out.add_tokens([a])
                }
                .map_err(|e| tokenizer_error(&path, e))?;
            }
            (
                out,
                first.model.dir().to_path_buf(),
                format!(
                    "union of {} vocabularies (base `{}` first)",
                    inputs.len(),
                    first.reference
                ),
            )
        }
    };
    // mergekit adds the keys of `tokens` when missing.
    let extra: Vec<AddedToken> = spec
        .tokens
        .iter()
        .map(|t| AddedToken::from(t.token.clone(), false))
        .collect();
    if !extra.is_empty() {
        tokenizer
            .add_tokens(extra)
            .map_err(|e| tokenizer_error(&files_dir.join("tokenizer.json"), e))?;
    }
    let out_vocab = tokenizer.get_vocab(true);
    let vocab_len = out_vocab
        .values()
        .map(|&i| i as usize + 1)
        .max()
        .unwrap_or(0);
    let mut by_id: Vec<Option<&str>> = vec![None; vocab_len];
    for (t, &i) in &out_vocab {
        by_id[i as usize] = Some(t.as_str());
    }
    let rows = match spec.pad_to_multiple_of {
        Some(m) if vocab_len % m != 0 => vocab_len.div_ceil(m) * m,
        _ => vocab_len,
    };
    if rows > vocab_len {
        description.push_str(&format!(
            ", padded from {vocab_len} to a multiple of {}",
            spec.pad_to_multiple_of.unwrap_or(1)
        ));
    }

    // Permutations: each input's own row of each output token.
    let perm: Vec<Vec<Option<u32>>> = vocabs
        .iter()
        .map(|v| {
            let map = if v.tokenizer.is_some() {
                &v.map
            } else {
                &vocabs[0].map
            };
            by_id
                .iter()
                .map(|t| t.and_then(|t| map.get(t).copied()))
                .collect()
        })
        .collect();
    let index_of = |r: &ModelRef, path: &str| -> Result<usize, EngineError> {
        inputs
            .iter()
            .position(|i| crate::plan::same_model(&i.reference, &r.reference))
            .ok_or_else(|| {
                ConfigError::Invalid {
                    path: path.to_string(),
                    pos: r.pos,
                    message: format!(
                        "`{}` is not one of the models of this merge (the base or `models`)",
                        r.reference
                    ),
                }
                .into()
            })
    };
    let configured: HashMap<&str, &TokenSetting> =
        spec.tokens.iter().map(|t| (t.token.as_str(), t)).collect();
    let mut forced = HashSet::new();
    let mut defaults = Vec::with_capacity(vocab_len);
    for (id, tok) in by_id.iter().enumerate() {
        let present: Vec<(usize, u32)> = perm
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p[id].map(|r| (i, r)))
            .collect();
        let row = match tok.and_then(|t| configured.get(t)) {
            Some(cfg) => {
                if cfg.force {
                    forced.insert(id as u32);
                }
                match &cfg.source {
                    RowSource::Zero => Row::Zero,
                    RowSource::Model(m) => {
                        let input = index_of(m, &format!("{}.source", cfg.path))?;
                        let row = perm[input][id].ok_or_else(|| ConfigError::Invalid {
                            path: format!("{}.source", cfg.path),
                            pos: m.pos,
                            message: format!(
                                "model `{}` has no token `{}`",
                                m.reference, cfg.token
                            ),
                        })?;
                        Row::Of { input, row }
                    }
                    RowSource::ModelToken {
                        model,
                        token_id,
                        token,
                    } => {
                        let path = format!("{}.source", cfg.path);
                        let input = index_of(model, &path)?;
                        let row =
                            match (token_id, token) {
                                (Some(i), _) => *i,
                                (None, Some(t)) => *vocabs[input].map.get(t).ok_or_else(|| {
                                    ConfigError::Invalid {
                                        path: path.clone(),
                                        pos: model.pos,
                                        message: format!(
                                            "model `{}` has no token `{t}`",
                                            model.reference
                                        ),
                                    }
                                })?,
                                (None, None) => unreachable!("checked when parsed"),
                            };
                        let n = embedding_rows(&inputs[input]).unwrap_or(0);
                        if row as usize >= n {
                            return Err(ConfigError::Invalid {
                                path,
                                pos: model.pos,
                                message: format!(
                                    "token id {row} is out of range for model `{}` ({n} rows)",
                                    model.reference
                                ),
                            }
                            .into());
                        }
                        Row::Of { input, row }
                    }
                }
            }
            None => match present.len() {
                0 => Row::Zero,
                1 => Row::Of {
                    input: present[0].0,
                    row: present[0].1,
                },
                _ if has_base && perm[0][id].is_some() => Row::Of {
                    input: 0,
                    row: perm[0][id].unwrap_or(0),
                },
                _ => Row::Mean(present),
            },
        };
        defaults.push(row);
    }
    let identity = perm
        .iter()
        .zip(&inputs)
        .map(|(p, i)| {
            rows == vocab_len
                && forced.is_empty()
                && embedding_rows(i) == Some(vocab_len)
                && p.iter().enumerate().all(|(r, x)| *x == Some(r as u32))
        })
        .collect();
    Ok(TokenizerPlan {
        identity,
        tokenizer,
        files_dir,
        vocab_len,
        rows,
        description,
        inputs,
        perm,
        defaults,
        forced,
        pad_means: Mutex::new(HashMap::new()),
    })
}

impl TokenizerPlan {
    /// The index of input `reference` among the plan's inputs.
    pub(crate) fn input_index(&self, reference: &str) -> Option<usize> {
        self.inputs
            .iter()
            .position(|i| i.reference == reference)
            .or_else(|| {
                self.inputs
                    .iter()
                    .position(|i| crate::plan::same_model(&i.reference, reference))
            })
    }

    /// Whether input `input`'s permuted matrix is its own matrix.
    pub(crate) fn is_identity(&self, input: usize) -> bool {
        self.identity[input]
    }

    /// Where row `row` of input `input`'s permuted matrix comes from.
    pub(crate) fn row_source(&self, input: usize, row: usize) -> Row {
        if row >= self.vocab_len {
            return Row::Pad;
        }
        match self.perm[input][row] {
            Some(r) if !self.forced.contains(&(row as u32)) => Row::Of { input, row: r },
            _ => self.defaults[row].clone(),
        }
    }

    /// Reads elements `range` of input `input`'s permuted matrix `name`
    /// (`cols` columns) into `out`, with `read` reading elements of an
    /// input's own tensor. Returns the bytes read.
    pub(crate) fn read_permuted(
        &self,
        input: usize,
        name: &str,
        cols: usize,
        range: std::ops::Range<usize>,
        out: &mut Vec<f32>,
        read: ReadRows<'_>,
    ) -> Result<u64, EngineError> {
        out.clear();
        out.resize(range.len(), 0.0);
        let mut bytes = 0;
        let mut tmp = Vec::new();
        let mut pos = range.start;
        while pos < range.end {
            let row = pos / cols;
            let c0 = pos - row * cols;
            let c1 = cols.min(c0 + (range.end - pos));
            let dst = &mut out[pos - range.start..pos - range.start + (c1 - c0)];
            match self.row_source(input, row) {
                Row::Zero => dst.fill(0.0),
                Row::Of { input: i, row: r } => {
                    let base = r as usize * cols;
                    bytes += read(i, base + c0..base + c1, &mut tmp)?;
                    dst.copy_from_slice(&tmp);
                }
                Row::Mean(rows) => {
                    dst.fill(0.0);
                    for &(i, r) in &rows {
                        let base = r as usize * cols;
                        bytes += read(i, base + c0..base + c1, &mut tmp)?;
                        for (d, s) in dst.iter_mut().zip(&tmp) {
                            *d += *s;
                        }
                    }
                    let n = rows.len() as f32;
                    for d in dst.iter_mut() {
                        *d /= n;
                    }
                }
                Row::Pad => {
                    let mean = self.pad_mean(input, name, cols, read)?;
                    dst.copy_from_slice(&mean[c0..c1]);
                }
            }
            pos += c1 - c0;
        }
        Ok(bytes)
    }

    /// The mean of input `input`'s real permuted rows of `name`.
    fn pad_mean(
        &self,
        input: usize,
        name: &str,
        cols: usize,
        read: ReadRows<'_>,
    ) -> Result<Arc<Vec<f32>>, EngineError> {
        let key = (name.to_string(), input);
        if let Some(m) = self
            .pad_means
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(m.clone());
        }
        let mut sum = vec![0f64; cols];
        let mut row = Vec::new();
        for r in 0..self.vocab_len {
            self.read_permuted(input, name, cols, r * cols..(r + 1) * cols, &mut row, read)?;
            for (s, v) in sum.iter_mut().zip(&row) {
                *s += *v as f64;
            }
        }
        let n = self.vocab_len.max(1) as f64;
        let mean = Arc::new(sum.into_iter().map(|s| (s / n) as f32).collect::<Vec<_>>());
        self.pad_means
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, mean.clone());
        Ok(mean)
    }

    /// Writes `tokenizer.json`, `tokenizer_config.json` (its
    /// `added_tokens_decoder` describing the output's added tokens) and
    /// `special_tokens_map.json` into `dir`, replacing the copied ones.
    pub(crate) fn write(&self, dir: &Path) -> Result<(), EngineError> {
        let path = dir.join("tokenizer.json");
        self.tokenizer
            .save(&path, false)
            .map_err(|e| tokenizer_error(&path, e))?;
        for stale in [
            "added_tokens.json",
            "vocab.json",
            "merges.txt",
            "vocab.txt",
            "tokenizer.model",
        ] {
            let p = dir.join(stale);
            if p.is_file() {
                std::fs::remove_file(&p).map_err(|e| tokenizer_error(&p, e))?;
            }
        }
        let cfg_path = dir.join("tokenizer_config.json");
        let mut cfg = read_json_object(&self.files_dir.join("tokenizer_config.json"))?;
        let mut decoder = serde_json::Map::new();
        let mut added: Vec<_> = self
            .tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .collect();
        added.sort_by_key(|(id, _)| *id);
        for (id, a) in added {
            decoder.insert(
                id.to_string(),
                serde_json::json!({
                    "content": a.content,
                    "lstrip": a.lstrip,
                    "normalized": a.normalized,
                    "rstrip": a.rstrip,
                    "single_word": a.single_word,
                    "special": a.special,
                }),
            );
        }
        cfg.insert(
            "added_tokens_decoder".into(),
            serde_json::Value::Object(decoder),
        );
        cfg.entry("tokenizer_class")
            .or_insert_with(|| "PreTrainedTokenizerFast".into());
        write_json(&cfg_path, &serde_json::Value::Object(cfg))?;
        let map_path = dir.join("special_tokens_map.json");
        let src_map = self.files_dir.join("special_tokens_map.json");
        if !src_map.is_file() {
            // Derive it from the tokenizer config's special-token fields.
            let cfg = read_json_object(&cfg_path)?;
            let mut map = serde_json::Map::new();
            for k in [
                "bos_token",
                "eos_token",
                "unk_token",
                "sep_token",
                "pad_token",
                "cls_token",
                "mask_token",
                "additional_special_tokens",
            ] {
                if let Some(v) = cfg.get(k).filter(|v| !v.is_null()) {
                    map.insert(k.into(), v.clone());
                }
            }
            write_json(&map_path, &serde_json::Value::Object(map))?;
        }
        Ok(())
    }
}

fn read_json_object(
    path: &Path,
) -> Result<serde_json::Map<String, serde_json::Value>, EngineError> {
    if !path.is_file() {
        return Ok(serde_json::Map::new());
    }
    let text = std::fs::read_to_string(path).map_err(|e| tokenizer_error(path, e))?;
    match serde_json::from_str(&text).map_err(|e| tokenizer_error(path, e))? {
        serde_json::Value::Object(m) => Ok(m),
        _ => Err(tokenizer_error(path, "not a JSON object")),
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), EngineError> {
    let text = serde_json::to_string_pretty(v).map_err(|e| tokenizer_error(path, e))?;
    std::fs::write(path, text + "\n").map_err(|e| tokenizer_error(path, e))
}

/// The text of `chat_template` (`auto`: the template most of `inputs`
/// carry in their `tokenizer_config.json`, ties to the first; `None` when
/// none has one).
pub(crate) fn chat_template_text(
    t: &ChatTemplate,
    inputs: &[&Input],
) -> Result<Option<String>, EngineError> {
    if let Some((_, text)) = CHAT_TEMPLATES.iter().find(|(n, _)| *n == t.value) {
        return Ok(Some((*text).to_string()));
    }
    if t.value != "auto" {
        return Ok(Some(t.value.clone()));
    }
    let mut counts: Vec<(String, usize)> = Vec::new();
    for i in inputs {
        let cfg = read_json_object(&i.model.dir().join("tokenizer_config.json"))?;
        let text = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.trim().to_string()),
            _ => None,
        };
        if let Some(s) = text {
            match counts.iter_mut().find(|(c, _)| *c == s) {
                Some((_, n)) => *n += 1,
                None => counts.push((s, 1)),
            }
        }
    }
    let best = counts.iter().map(|(_, n)| *n).max();
    Ok(best.and_then(|b| counts.into_iter().find(|(_, n)| *n == b).map(|(s, _)| s)))
}

/// Writes `template` into `dir/tokenizer_config.json` (created when
/// missing) and removes a copied `chat_template.jinja`/`chat_template.json`,
/// which `transformers` would prefer.
pub(crate) fn write_chat_template(dir: &Path, template: &str) -> Result<(), EngineError> {
    let path = dir.join("tokenizer_config.json");
    let mut cfg = read_json_object(&path)?;
    cfg.insert("chat_template".into(), template.into());
    write_json(&path, &serde_json::Value::Object(cfg))?;
    for stale in ["chat_template.jinja", "chat_template.json"] {
        let p = dir.join(stale);
        if p.is_file() {
            std::fs::remove_file(&p).map_err(|e| tokenizer_error(&p, e))?;
        }
    }
    Ok(())
}

/// Sets `vocab_size` in `config.json` (when it has the key, or always when
/// `always`).
pub(crate) fn set_vocab_size(config_json: &Path, rows: usize) -> Result<(), EngineError> {
    let mut cfg = read_json_object(config_json)?;
    let key = ["vocab_size", "n_vocab", "padded_vocab_size"]
        .into_iter()
        .find(|k| cfg.contains_key(*k))
        .unwrap_or("vocab_size");
    cfg.insert(key.into(), rows.into());
    write_json(config_json, &serde_json::Value::Object(cfg))
}

/// Compares the vocabularies of `inputs` when no tokenizer source is
/// configured: `Some(detail)` names the first pair that differs.
pub(crate) fn vocab_difference(inputs: &[&Input]) -> Result<Option<String>, EngineError> {
    let Some(first) = inputs.first() else {
        return Ok(None);
    };
    let rows0 = embedding_rows(first);
    let bytes = |i: &Input| std::fs::read(i.model.dir().join("tokenizer.json")).ok();
    // Only tokenizers that parse are compared: a file the `tokenizers`
    // crate cannot read is copied as it is, as before.
    let vocab = |i: &Input| {
        Tokenizer::from_file(i.model.dir().join("tokenizer.json"))
            .ok()
            .map(|t| t.get_vocab(true))
    };
    let bytes0 = bytes(first);
    let mut vocab0 = None;
    for other in &inputs[1..] {
        if std::sync::Arc::ptr_eq(&other.model, &first.model) {
            continue;
        }
        let rows = embedding_rows(other);
        if rows != rows0 {
            return Ok(Some(format!(
                "`{}` has {} embedding rows, `{}` has {}",
                first.reference,
                rows0.map_or("no".into(), |r| r.to_string()),
                other.reference,
                rows.map_or("no".into(), |r| r.to_string())
            )));
        }
        let b = bytes(other);
        if b.is_none() || bytes0.is_none() || b == bytes0 {
            continue;
        }
        if vocab0.is_none() {
            vocab0 = Some(vocab(first));
        }
        if let (Some(Some(a)), Some(b)) = (&vocab0, vocab(other))
            && *a != b
        {
            let mut diff: Vec<&String> = b
                .iter()
                .filter(|(t, id)| a.get(*t) != Some(id))
                .map(|(t, _)| t)
                .collect();
            diff.sort();
            let shown: Vec<String> = diff.iter().take(3).map(|t| format!("`{t}`")).collect();
            return Ok(Some(format!(
                "the tokenizer.json vocabularies of `{}` ({} tokens) and `{}` ({} tokens) differ (for example {})",
                first.reference,
                a.len(),
                other.reference,
                b.len(),
                if shown.is_empty() {
                    format!(
                        "tokens of `{}` missing in `{}`",
                        first.reference, other.reference
                    )
                } else {
                    shown.join(", ")
                }
            )));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    use tensormerge_core::{DType, TensorInfo, convert};
    use tensormerge_io::{Model, ModelWriter, WriterOptions};
    use tokenizers::models::wordlevel::WordLevel;

    fn spec(text: &str) -> TokenizerSpec {
        let c = crate::MergeConfig::from_yaml_str(&format!(
            "merge_method: linear\nmodels: [{{model: a}}]\n{text}"
        ))
        .unwrap();
        c.tokenizer_spec().unwrap()
    }

    fn err(text: &str) -> String {
        crate::MergeConfig::from_yaml_str(&format!(
            "merge_method: linear\nmodels: [{{model: a}}]\n{text}"
        ))
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn sections_parse_with_mergekits_defaults() {
        assert_eq!(
            spec("tokenizer_source: union\n").source,
            TokenizerSource::Union
        );
        assert_eq!(
            spec("tokenizer_source: base\n").source,
            TokenizerSource::Base
        );
        let s = spec(
            "tokenizer:\n  tokens:\n    x: {source: ./m, force: true}\n    y: {source: {kind: zero}}\n    z: {source: {kind: model_token, model: ./m, token_id: 3}}\n  pad_to_multiple_of: 8\n",
        );
        assert_eq!(
            s.source,
            TokenizerSource::Union,
            "mergekit's default source"
        );
        assert_eq!(s.pad_to_multiple_of, Some(8));
        assert_eq!(s.tokens.len(), 3);
        assert!(
            s.tokens[0].force
                && matches!(&s.tokens[0].source, RowSource::Model(m) if m.reference == "./m")
        );
        assert_eq!(s.tokens[1].source, RowSource::Zero);
        assert!(matches!(
            &s.tokens[2].source,
            RowSource::ModelToken {
                token_id: Some(3),
                token: None,
                ..
            }
        ));
        assert!(err("tokenizer:\n  pad_to_multiple_of: 0\n").contains("integer ≥ 1"));
        assert!(
            err("tokenizer:\n  tokens:\n    x: {source: {kind: one}}\n").contains("unknown kind")
        );
        assert!(
            err("tokenizer:\n  tokens:\n    x: {source: {kind: model_token, model: m}}\n")
                .contains("exactly one of `token` and `token_id`")
        );
        assert!(err("tokenizer:\n  tokens:\n    x: {force: yes}\n").contains("true or false"));
        assert!(err("chat_template: '{x}'\n").contains("neither a known template"));
        let c = crate::MergeConfig::from_yaml_str(
            "merge_method: linear\nmodels: [{model: a}]\nchat_template: mistral\n",
        )
        .unwrap();
        assert_eq!(c.chat_template.unwrap().value, "mistral");
    }

    /// A model with one embedding row per token (row r = [seed, r]) and a
    /// WordLevel tokenizer over `vocab`.
    fn model(dir: &Path, seed: f32, vocab: &[&str]) -> Input {
        let n = vocab.len();
        let t = vec![TensorInfo::new(
            "model.embed_tokens.weight",
            vec![n, 2],
            DType::F32,
        )];
        let mut w = ModelWriter::create(dir, t, WriterOptions::default()).unwrap();
        let v: Vec<f32> = (0..n).flat_map(|r| [seed, r as f32]).collect();
        w.write(
            "model.embed_tokens.weight",
            &convert::encode_f32_vec(DType::F32, &v).unwrap(),
        )
        .unwrap();
        w.finish().unwrap();
        let map = vocab
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let wl = WordLevel::builder()
            .vocab(map)
            .unk_token("u".into())
            .build()
            .unwrap();
        Tokenizer::new(wl)
            .save(dir.join("tokenizer.json"), false)
            .unwrap();
        Input {
            reference: dir.display().to_string(),
            model: Arc::new(Model::open_path(dir).unwrap()),
        }
    }

    #[test]
    fn union_order_and_default_rows() {
        let tmp = tempfile::tempdir().unwrap();
        let base = model(&tmp.path().join("base"), 1.0, &["u", "a", "b"]);
        let m1 = model(&tmp.path().join("m1"), 2.0, &["u", "c", "a", "d"]);
        let m2 = model(&tmp.path().join("m2"), 3.0, &["d", "u", "c", "e"]);
        let spec = TokenizerSpec {
            source: TokenizerSource::Union,
            tokens: Vec::new(),
            pad_to_multiple_of: Some(4),
        };
        let p = build(&spec, vec![base, m1, m2], true, None).unwrap();
        let v = p.tokenizer.get_vocab(true);
        let order: Vec<&str> = ["u", "a", "b", "c", "d", "e"].to_vec();
        for (i, t) in order.iter().enumerate() {
            assert_eq!(v[*t], i as u32, "{t}");
        }
        assert_eq!((p.vocab_len, p.rows), (6, 8));
        // own rows
        assert_eq!(p.row_source(1, 1), Row::Of { input: 1, row: 2 });
        // `b`: only the base has it
        assert_eq!(p.row_source(2, 2), Row::Of { input: 0, row: 2 });
        // `c`: m1 and m2, not the base: the average
        assert_eq!(p.row_source(0, 3), Row::Mean(vec![(1, 1), (2, 2)]));
        // `a`: base and m1: the base's row for m2
        assert_eq!(p.row_source(2, 1), Row::Of { input: 0, row: 1 });
        // padding
        assert_eq!(p.row_source(0, 7), Row::Pad);
        // A permuted read: m2's rows 0..8 (values [seed, own row]).
        let read =
            |i: usize, r: std::ops::Range<usize>, out: &mut Vec<f32>| -> Result<u64, EngineError> {
                let all = p.inputs[i]
                    .model
                    .read_f32_vec("model.embed_tokens.weight")
                    .unwrap();
                out.clear();
                out.extend_from_slice(&all[r.clone()]);
                Ok((r.len() * 4) as u64)
            };
        let mut out = Vec::new();
        p.read_permuted(2, "model.embed_tokens.weight", 2, 1..16, &mut out, &read)
            .unwrap();
        let rows: [[f32; 2]; 6] = [
            [3.0, 1.0], // u
            [1.0, 1.0], // a: base
            [1.0, 2.0], // b: only base
            [3.0, 2.0], // c: own
            [3.0, 0.0], // d: own
            [3.0, 3.0], // e: own
        ];
        let mean = [
            (3.0 * 4.0 + 1.0 * 2.0) / 6.0, // u c d e from m2 (3), a b from the base (1)
            (1.0 + 1.0 + 2.0 + 2.0 + 0.0 + 3.0) / 6.0,
        ];
        let mut want: Vec<f32> = rows.iter().flatten().copied().collect();
        want.extend_from_slice(&mean);
        want.extend_from_slice(&mean);
        for (g, w) in out.iter().zip(&want[1..]) {
            assert!((g - w).abs() < 1e-6, "{out:?} vs {want:?}");
        }
        assert_eq!(out.len(), 15);
    }

    #[test]
    fn auto_chat_template_takes_the_most_common() {
        let tmp = tempfile::tempdir().unwrap();
        let ms: Vec<Input> = ["x", "y", "z"]
            .iter()
            .map(|n| model(&tmp.path().join(n), 1.0, &["u"]))
            .collect();
        let auto = ChatTemplate {
            value: "auto".into(),
            pos: Pos::default(),
        };
        let refs: Vec<&Input> = ms.iter().collect();
        assert_eq!(chat_template_text(&auto, &refs).unwrap(), None);
        for (m, t) in ms.iter().zip(["{{ one }}", "{{ two }} ", "{{ two }}"]) {
            let cfg = serde_json::json!({ "chat_template": t });
            std::fs::write(m.model.dir().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        }
        assert_eq!(
            chat_template_text(&auto, &refs).unwrap().as_deref(),
            Some("{{ two }}")
        );
        let named = ChatTemplate {
            value: "chatml".into(),
            pos: Pos::default(),
        };
        assert!(
            chat_template_text(&named, &refs)
                .unwrap()
                .unwrap()
                .contains("<|im_end|>")
        );
    }

    #[test]
    fn embedding_names() {
        for n in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "transformer.wte.weight",
            "wte.weight",
            "bert.embeddings.word_embeddings.weight",
            "embeddings.word_embeddings.weight",
        ] {
            assert!(is_embedding(n), "{n}");
        }
        for n in [
            "model.norm.weight",
            "xlm_head.weight",
            "model.layers.0.mlp.weight",
            "wpe.weight",
        ] {
            assert!(!is_embedding(n), "{n}");
        }
    }
}
