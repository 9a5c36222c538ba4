//! Tokenizer and parser: source text to a postfix program.
//!
//! The parser is recursive descent over the grammar
//!
//! ```text
//! expr    := term (('+' | '-') term)*
//! term    := unary (('*' | '/') unary)*
//! unary   := '-'* primary
//! primary := NUMBER | NAME | '(' expr ')'
//! ```
//!
//! Binary chains are loops and runs of unary minus are counted, so the only
//! recursion is through parentheses, which is limited to [`MAX_DEPTH`]. The
//! output is a flat postfix (`Vec<Node>`) rather than a tree of boxes, so
//! neither evaluating nor dropping a very long expression recurses.

use std::collections::HashMap;

use super::{BinOp, Expr, ExprError, MAX_DEPTH, MAX_LEN, Node};

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f32),
    Name(String),
    Op(BinOp),
    LParen,
    RParen,
    End,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    /// 1-based character column of the token's first character.
    column: usize,
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Num(_) => "a number".into(),
        Tok::Name(n) => format!("model name `{n}`"),
        Tok::Op(op) => format!("`{}`", op.symbol()),
        Tok::LParen => "`(`".into(),
        Tok::RParen => "`)`".into(),
        Tok::End => "the end of the expression".into(),
    }
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn tokenize(src: &str) -> Result<Vec<Token>, ExprError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let column = i + 1;
        let simple = match c {
            '+' => Some(Tok::Op(BinOp::Add)),
            '-' => Some(Tok::Op(BinOp::Sub)),
            '*' => Some(Tok::Op(BinOp::Mul)),
            '/' => Some(Tok::Op(BinOp::Div)),
            '(' => Some(Tok::LParen),
            ')' => Some(Tok::RParen),
            _ => None,
        };
        if let Some(tok) = simple {
            out.push(Token { tok, column });
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if is_name_start(c) {
            let start = i;
            while i < chars.len() && is_name_char(chars[i]) {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Name(chars[start..i].iter().collect()),
                column,
            });
        } else if c.is_ascii_digit() || c == '.' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            // Exponent: `e`/`E`, optional sign, digits.
            if i < chars.len() && (chars[i] == 'e' || chars[i] == 'E') {
                let mut j = i + 1;
                if j < chars.len() && (chars[j] == '+' || chars[j] == '-') {
                    j += 1;
                }
                if j < chars.len() && chars[j].is_ascii_digit() {
                    while j < chars.len() && chars[j].is_ascii_digit() {
                        j += 1;
                    }
                    i = j;
                } else {
                    return Err(ExprError::syntax(
                        src,
                        j + 1,
                        "expected the digits of an exponent",
                    ));
                }
            }
            // A name glued to a number (`2base`) is a typo, not a product.
            if i < chars.len() && is_name_char(chars[i]) {
                return Err(ExprError::syntax(
                    src,
                    i + 1,
                    format!(
                        "unexpected `{}` after a number (write `*` for a product)",
                        chars[i]
                    ),
                ));
            }
            let text: String = chars[start..i].iter().collect();
            let value: f32 = text.parse().map_err(|_| {
                ExprError::syntax(src, column, format!("`{text}` is not a valid number"))
            })?;
            if !value.is_finite() {
                return Err(ExprError::syntax(
                    src,
                    column,
                    format!("`{text}` is too large for a 32-bit float"),
                ));
            }
            out.push(Token {
                tok: Tok::Num(value),
                column,
            });
        } else {
            let hint = if c == '^' {
                " (there is no power operator)"
            } else if c == '=' || c == ',' || c == ';' {
                " (an expression is a single formula)"
            } else {
                ""
            };
            return Err(ExprError::syntax(
                src,
                column,
                format!("unexpected character `{}`{hint}", c.escape_default()),
            ));
        }
    }
    out.push(Token {
        tok: Tok::End,
        column: chars.len() + 1,
    });
    Ok(out)
}

struct Parser<'a> {
    src: &'a str,
    tokens: Vec<Token>,
    pos: usize,
    nodes: Vec<Node>,
    models: Vec<(String, usize)>,
    /// Index into `models` by name.
    index: HashMap<String, usize>,
}

impl Parser<'_> {
    fn peek(&self) -> &Token {
        &self.tokens[self.pos]
    }

    fn bump(&mut self) -> Token {
        let t = self.tokens[self.pos].clone();
        if self.pos + 1 < self.tokens.len() {
            self.pos += 1;
        }
        t
    }

    fn expr(&mut self, depth: usize) -> Result<(), ExprError> {
        self.term(depth)?;
        while let Tok::Op(op @ (BinOp::Add | BinOp::Sub)) = self.peek().tok {
            self.bump();
            self.term(depth)?;
            self.nodes.push(Node::Binary(op));
        }
        Ok(())
    }

    fn term(&mut self, depth: usize) -> Result<(), ExprError> {
        self.unary(depth)?;
        while let Tok::Op(op @ (BinOp::Mul | BinOp::Div)) = self.peek().tok {
            self.bump();
            self.unary(depth)?;
            self.nodes.push(Node::Binary(op));
        }
        Ok(())
    }

    fn unary(&mut self, depth: usize) -> Result<(), ExprError> {
        let mut negations = 0usize;
        while self.peek().tok == Tok::Op(BinOp::Sub) {
            self.bump();
            negations += 1;
        }
        self.primary(depth)?;
        self.nodes.extend(std::iter::repeat_n(Node::Neg, negations));
        Ok(())
    }

    fn primary(&mut self, depth: usize) -> Result<(), ExprError> {
        let t = self.bump();
        match t.tok {
            Tok::Num(v) => self.nodes.push(Node::Scalar(v)),
            Tok::Name(name) => {
                let index = match self.index.get(&name) {
                    Some(&i) => i,
                    None => {
                        let i = self.models.len();
                        self.index.insert(name.clone(), i);
                        self.models.push((name, t.column));
                        i
                    }
                };
                self.nodes.push(Node::Model {
                    index,
                    column: t.column,
                });
            }
            Tok::LParen => {
                if depth >= MAX_DEPTH {
                    return Err(ExprError::TooDeep {
                        column: t.column,
                        max: MAX_DEPTH,
                        snippet: super::snippet(self.src, t.column),
                    });
                }
                self.expr(depth + 1)?;
                let close = self.bump();
                if close.tok != Tok::RParen {
                    return Err(ExprError::syntax(
                        self.src,
                        close.column,
                        format!(
                            "expected `)` to close the `(` at column {}, found {}",
                            t.column,
                            describe(&close.tok)
                        ),
                    ));
                }
            }
            Tok::Op(BinOp::Add) => {
                return Err(ExprError::syntax(
                    self.src,
                    t.column,
                    "expected a model name, a number or `(`, found `+` (there is no unary plus)",
                ));
            }
            other => {
                return Err(ExprError::syntax(
                    self.src,
                    t.column,
                    format!(
                        "expected a model name, a number or `(`, found {}",
                        describe(&other)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Parses `src` into an [`Expr`].
pub(super) fn parse(src: &str) -> Result<Expr, ExprError> {
    if src.len() > MAX_LEN {
        return Err(ExprError::TooLong {
            len: src.len(),
            max: MAX_LEN,
        });
    }
    let tokens = tokenize(src)?;
    let mut p = Parser {
        src,
        tokens,
        pos: 0,
        nodes: Vec::new(),
        models: Vec::new(),
        index: HashMap::new(),
    };
    if p.peek().tok == Tok::End {
        return Err(ExprError::syntax(src, 1, "the expression is empty"));
    }
    p.expr(0)?;
    let t = p.peek().clone();
    if t.tok != Tok::End {
        let message = match t.tok {
            Tok::RParen => "unmatched `)`".to_string(),
            Tok::Num(_) | Tok::Name(_) | Tok::LParen => format!(
                "expected an operator (`+ - * /`) before {}",
                describe(&t.tok)
            ),
            other => format!("unexpected {}", describe(&other)),
        };
        return Err(ExprError::syntax(src, t.column, message));
    }
    if p.models.is_empty() {
        return Err(ExprError::NoModel {
            source_text: src.to_string(),
        });
    }
    Ok(Expr {
        source: src.to_string(),
        nodes: p.nodes,
        models: p.models,
    })
}
