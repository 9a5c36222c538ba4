//! Element-wise evaluation of a postfix program on `f32` slices.

use std::ops::Range;

use super::{BinOp, Expr, ExprError, Node};

/// Elements per block: the program runs over one block at a time, so that
/// its intermediate values stay in the first-level caches.
const BLOCK: usize = 2048;

/// One operand of a binary kernel.
#[derive(Clone, Copy)]
enum Src<'a> {
    /// The destination buffer itself (in-place operand).
    Dst,
    Scalar(f32),
    Slice(&'a [f32]),
}

#[inline(always)]
fn apply<F: Fn(f32, f32) -> f32>(f: F, dst: &mut [f32], l: Src<'_>, r: Src<'_>) {
    match (l, r) {
        (Src::Dst, Src::Slice(b)) => dst.iter_mut().zip(b).for_each(|(d, b)| *d = f(*d, *b)),
        (Src::Dst, Src::Scalar(b)) => dst.iter_mut().for_each(|d| *d = f(*d, b)),
        (Src::Slice(a), Src::Dst) => dst.iter_mut().zip(a).for_each(|(d, a)| *d = f(*a, *d)),
        (Src::Scalar(a), Src::Dst) => dst.iter_mut().for_each(|d| *d = f(a, *d)),
        (Src::Slice(a), Src::Slice(b)) => dst
            .iter_mut()
            .zip(a.iter().zip(b))
            .for_each(|(d, (a, b))| *d = f(*a, *b)),
        (Src::Slice(a), Src::Scalar(b)) => dst.iter_mut().zip(a).for_each(|(d, a)| *d = f(*a, b)),
        (Src::Scalar(a), Src::Slice(b)) => dst.iter_mut().zip(b).for_each(|(d, b)| *d = f(a, *b)),
        (Src::Scalar(a), Src::Scalar(b)) => dst.iter_mut().for_each(|d| *d = f(a, b)),
        (Src::Dst, Src::Dst) => dst.iter_mut().for_each(|d| *d = f(*d, *d)),
    }
}

/// The same `f32` operation `ParamVector`'s operators perform per element,
/// compiled for AVX2 where the CPU has it (eight lanes instead of SSE2's
/// four; the same IEEE operation per element, so the same bits).
fn binary(op: BinOp, dst: &mut [f32], l: Src<'_>, r: Src<'_>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { binary_avx2(op, dst, l, r) };
        return;
    }
    binary_any(op, dst, l, r)
}

/// [`binary`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn binary_avx2(op: BinOp, dst: &mut [f32], l: Src<'_>, r: Src<'_>) {
    binary_any(op, dst, l, r)
}

/// [`binary`] for the target's baseline instruction set (inlined into
/// [`binary_avx2`] too).
#[inline(always)]
fn binary_any(op: BinOp, dst: &mut [f32], l: Src<'_>, r: Src<'_>) {
    match op {
        BinOp::Add => apply(|a, b| a + b, dst, l, r),
        BinOp::Sub => apply(|a, b| a - b, dst, l, r),
        BinOp::Mul => apply(|a, b| a * b, dst, l, r),
        BinOp::Div => apply(|a, b| a / b, dst, l, r),
    }
}

/// A value on the evaluation stack.
#[derive(Clone, Copy, Debug)]
enum Slot {
    Scalar(f32),
    /// The input of model `i`.
    Model(usize),
    /// Scratch buffer `i`.
    Buf(usize),
}

/// Evaluates an [`Expr`] element-wise on `f32` slices, one chunk at a time,
/// with a fixed set of scratch buffers reused across chunks.
///
/// Each element is computed with exactly the `f32` operations, in exactly the
/// order, that evaluating the expression on [`ParamVector`]s performs, so the
/// results are bit-identical to [`eval_vectors`](super::eval_vectors).
///
/// [`ParamVector`]: tensormerge_core::ParamVector
///
/// ```
/// use tensormerge_engine::expr::{parse, Evaluator};
/// let e = parse("base + 0.5 * (ft - base)").unwrap();
/// let mut ev = Evaluator::new(&e);
/// let (base, ft) = ([1.0f32, 2.0], [3.0f32, 2.0]);
/// // Inputs are indexed like `e.models()`: base, ft.
/// let out = ev.eval(&[&base, &ft], 2).unwrap();
/// assert_eq!(out, &[2.0, 2.0]);
/// ```
#[derive(Debug, Clone)]
pub struct Evaluator {
    nodes: Vec<Node>,
    n_models: usize,
    bufs: Vec<Vec<f32>>,
    stack: Vec<Slot>,
    free: Vec<usize>,
}

impl Evaluator {
    /// An evaluator for `expr`.
    pub fn new(expr: &Expr) -> Self {
        let n = scratch_buffers(&expr.nodes);
        Evaluator {
            nodes: expr.nodes.clone(),
            n_models: expr.models.len(),
            bufs: vec![Vec::new(); n],
            stack: Vec::new(),
            free: Vec::new(),
        }
    }

    /// How many chunk-sized scratch buffers evaluation needs (besides the
    /// inputs): the memory of one chunk is `(inputs + scratch) × len × 4` bytes.
    pub fn scratch_buffers(&self) -> usize {
        self.bufs.len()
    }

    /// Evaluates `len` elements. `inputs[i]` holds the values of the model
    /// `expr.models()[i]` and must have `len` elements. Returns the result,
    /// borrowed from the evaluator's scratch space or from an input.
    pub fn eval<'a>(
        &'a mut self,
        inputs: &[&'a [f32]],
        len: usize,
    ) -> Result<&'a [f32], ExprError> {
        if inputs.len() != self.n_models {
            return Err(ExprError::Inputs {
                detail: format!(
                    "expected {} input slices, got {}",
                    self.n_models,
                    inputs.len()
                ),
            });
        }
        if let Some(i) = inputs.iter().position(|s| s.len() != len) {
            return Err(ExprError::Inputs {
                detail: format!("input {i} has {} elements, expected {len}", inputs[i].len()),
            });
        }
        for b in &mut self.bufs {
            if b.len() < len {
                b.resize(len, 0.0);
            }
        }
        // The program runs block by block, so that intermediate results stay
        // in cache; operations are element-wise, so blocking changes no bit.
        // Slot allocation depends on the program only, so every block leaves
        // its result in the same slot.
        let mut result = self.run_block(inputs, 0..len.min(BLOCK));
        let mut start = BLOCK;
        while start < len {
            let end = (start + BLOCK).min(len);
            result = self.run_block(inputs, start..end);
            start = end;
        }
        match result {
            Slot::Buf(i) => Ok(&self.bufs[i][..len]),
            Slot::Model(m) => Ok(inputs[m]),
            // `parse` refuses expressions without a model, and every operation
            // with a model operand yields a vector, so the result is one.
            Slot::Scalar(_) => Err(ExprError::Inputs {
                detail: "the expression evaluates to a scalar".into(),
            }),
        }
    }

    /// Runs the program on elements `r` of the inputs, into the same range
    /// of the scratch buffers; returns the slot holding the result.
    fn run_block(&mut self, inputs: &[&[f32]], r: Range<usize>) -> Slot {
        self.stack.clear();
        self.free.clear();
        self.free.extend((0..self.bufs.len()).rev());
        for node in &self.nodes {
            match *node {
                Node::Scalar(v) => self.stack.push(Slot::Scalar(v)),
                Node::Model { index, .. } => self.stack.push(Slot::Model(index)),
                Node::Neg => {
                    let top = self.stack.pop().expect("postfix program is well formed");
                    let slot = match top {
                        Slot::Scalar(v) => Slot::Scalar(-v),
                        Slot::Buf(i) => {
                            self.bufs[i][r.clone()].iter_mut().for_each(|x| *x = -*x);
                            Slot::Buf(i)
                        }
                        Slot::Model(m) => {
                            let i = self.free.pop().expect("scratch buffers were counted");
                            self.bufs[i][r.clone()]
                                .iter_mut()
                                .zip(&inputs[m][r.clone()])
                                .for_each(|(d, a)| *d = -*a);
                            Slot::Buf(i)
                        }
                    };
                    self.stack.push(slot);
                }
                Node::Binary(op) => {
                    let rhs = self.stack.pop().expect("postfix program is well formed");
                    let lhs = self.stack.pop().expect("postfix program is well formed");
                    let src = |s: Slot| match s {
                        Slot::Scalar(v) => Src::Scalar(v),
                        Slot::Model(m) => Src::Slice(&inputs[m][r.clone()]),
                        Slot::Buf(_) => Src::Dst,
                    };
                    let slot = match (lhs, rhs) {
                        (Slot::Scalar(a), Slot::Scalar(b)) => Slot::Scalar(match op {
                            BinOp::Add => a + b,
                            BinOp::Sub => a - b,
                            BinOp::Mul => a * b,
                            BinOp::Div => a / b,
                        }),
                        (Slot::Buf(i), Slot::Buf(j)) => {
                            let (dst, other) = pair_mut(&mut self.bufs, i, j);
                            binary(
                                op,
                                &mut dst[r.clone()],
                                Src::Dst,
                                Src::Slice(&other[r.clone()]),
                            );
                            self.free.push(j);
                            Slot::Buf(i)
                        }
                        (Slot::Buf(i), other) => {
                            binary(op, &mut self.bufs[i][r.clone()], Src::Dst, src(other));
                            Slot::Buf(i)
                        }
                        (other, Slot::Buf(j)) => {
                            binary(op, &mut self.bufs[j][r.clone()], src(other), Src::Dst);
                            Slot::Buf(j)
                        }
                        (a, b) => {
                            let i = self.free.pop().expect("scratch buffers were counted");
                            binary(op, &mut self.bufs[i][r.clone()], src(a), src(b));
                            Slot::Buf(i)
                        }
                    };
                    self.stack.push(slot);
                }
            }
        }
        self.stack.pop().expect("postfix program is well formed")
    }
}

/// Buffer `i` mutably and buffer `j` shared (`i != j`).
fn pair_mut(bufs: &mut [Vec<f32>], i: usize, j: usize) -> (&mut [f32], &[f32]) {
    if i < j {
        let (a, b) = bufs.split_at_mut(j);
        (&mut a[i], &b[0])
    } else {
        let (a, b) = bufs.split_at_mut(i);
        (&mut b[0], &a[j])
    }
}

/// The largest number of scratch buffers alive at once, found by running the
/// program on slot kinds only (same allocation rules as [`Evaluator::eval`]).
fn scratch_buffers(nodes: &[Node]) -> usize {
    #[derive(Clone, Copy, PartialEq)]
    enum K {
        S,
        M,
        B,
    }
    let mut stack: Vec<K> = Vec::new();
    let (mut live, mut max) = (0usize, 0usize);
    for node in nodes {
        match node {
            Node::Scalar(_) => stack.push(K::S),
            Node::Model { .. } => stack.push(K::M),
            Node::Neg => {
                let k = match stack.pop().unwrap_or(K::S) {
                    K::S => K::S,
                    K::M => {
                        live += 1;
                        K::B
                    }
                    K::B => K::B,
                };
                stack.push(k);
            }
            Node::Binary(_) => {
                let r = stack.pop().unwrap_or(K::S);
                let l = stack.pop().unwrap_or(K::S);
                let k = match (l, r) {
                    (K::S, K::S) => K::S,
                    (K::B, K::B) => {
                        live -= 1;
                        K::B
                    }
                    (K::B, _) | (_, K::B) => K::B,
                    _ => {
                        live += 1;
                        K::B
                    }
                };
                stack.push(k);
            }
        }
        max = max.max(live);
    }
    max
}
