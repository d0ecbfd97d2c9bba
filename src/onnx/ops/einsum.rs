//! ONNX Einsum: the equation is parsed once per call into labels (letters, and one label per broadcast
//! `...` axis), each operand's repeated labels become a diagonal and its private labels are summed away,
//! operands are then contracted pairwise as one batched matmul (batch, kept, contracted labels), and the
//! result is summed and permuted to the output's labels. Every step is a candle op, so gradients flow.

use candle_core::{DType, Tensor};
use candle_onnx::onnx::NodeProto;

use super::node_err;
use crate::error::Result;

/// A label: a letter's code, or 1000 + the position of a `...` axis counted from the right.
type Label = u32;

const ELLIPSIS: Label = 1000;

/// An operand: its tensor and one label per axis.
struct Term {
    t: Tensor,
    labels: Vec<Label>,
}

/// A label as the equation wrote it (`...` axes as `...`).
fn shown(l: Label) -> String {
    if l >= ELLIPSIS {
        "...".into()
    } else {
        char::from_u32(l).map_or("?".into(), String::from)
    }
}

/// Splits one side of the equation into letters and the `...` marker position.
fn letters(node: &NodeProto, s: &str) -> Result<(Vec<Label>, Option<usize>)> {
    let mut out = Vec::new();
    let mut dots = None;
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        if let Some(r) = rest.strip_prefix("...") {
            if dots.replace(out.len()).is_some() {
                return Err(node_err(node, format!("`{s}` has more than one `...`")));
            }
            rest = r;
            continue;
        }
        if !c.is_ascii_alphabetic() {
            return Err(node_err(node, format!("`{s}`: `{c}` is not a letter")));
        }
        out.push(c as Label);
        rest = &rest[1..];
    }
    Ok((out, dots))
}

/// Expands `...` to `n` broadcast labels (right-aligned, so operands of different ranks line up).
fn expand(labels: &[Label], dots: Option<usize>, n: usize) -> Vec<Label> {
    match dots {
        None => labels.to_vec(),
        Some(p) => {
            let mid = (0..n).rev().map(|i| ELLIPSIS + i as Label);
            labels[..p].iter().copied().chain(mid).chain(labels[p..].iter().copied()).collect()
        }
    }
}

/// Parses the equation against the operands' ranks: each operand's labels and the output's.
fn parse(node: &NodeProto, eq: &str, ranks: &[usize]) -> Result<(Vec<Vec<Label>>, Vec<Label>)> {
    let eq: String = eq.chars().filter(|c| !c.is_whitespace()).collect();
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l, Some(r)),
        None => (eq.as_str(), None),
    };
    let sides: Vec<&str> = lhs.split(',').collect();
    if sides.len() != ranks.len() {
        return Err(node_err(node, format!("equation `{eq}` names {} operands, given {}", sides.len(), ranks.len())));
    }
    let mut ops = Vec::new();
    let mut ell = 0;
    for (s, &r) in sides.iter().zip(ranks) {
        let (l, dots) = letters(node, s)?;
        let n = match dots {
            Some(_) if l.len() <= r => r - l.len(),
            None if l.len() == r => 0,
            _ => return Err(node_err(node, format!("`{s}` does not fit an operand of rank {r}"))),
        };
        ell = ell.max(n);
        ops.push(expand(&l, dots, n));
    }
    let out = match rhs {
        Some(r) => {
            let (l, dots) = letters(node, r)?;
            expand(&l, dots, ell)
        }
        None => {
            // Implicit output: the broadcast axes, then the letters used once, in alphabetical order.
            let all: Vec<Label> = ops.iter().flatten().copied().collect();
            let mut once: Vec<Label> =
                all.iter().copied().filter(|&l| l < ELLIPSIS && all.iter().filter(|&&m| m == l).count() == 1).collect();
            once.sort_unstable();
            (0..ell).rev().map(|i| ELLIPSIS + i as Label).chain(once).collect()
        }
    };
    Ok((ops, out))
}

/// Takes the diagonal of every label repeated within one operand.
fn diagonal(node: &NodeProto, mut term: Term) -> Result<Term> {
    while let Some((i, j)) = repeated(&term.labels) {
        let (n, m) = (term.t.dims()[i], term.t.dims()[j]);
        if n != m {
            return Err(node_err(
                node,
                format!("label `{}` repeats on axes of sizes {n} and {m}", shown(term.labels[i])),
            ));
        }
        // Move the pair last, flatten it and pick every (n + 1)-th element: the diagonal.
        let rank = term.t.rank();
        let mut perm: Vec<usize> = (0..rank).filter(|&a| a != i && a != j).collect();
        perm.extend([i, j]);
        let t = term.t.permute(perm.as_slice())?.contiguous()?;
        let mut shape = t.dims()[..rank - 2].to_vec();
        shape.push(n * n);
        let idx: Vec<u32> = (0..n as u32).map(|k| k * (n as u32 + 1)).collect();
        let ids = Tensor::from_vec(idx, n, t.device())?;
        term.t = t.reshape(shape.as_slice())?.index_select(&ids, rank - 2)?;
        let mut labels: Vec<Label> = perm[..rank - 2].iter().map(|&a| term.labels[a]).collect();
        labels.push(term.labels[i]);
        term.labels = labels;
    }
    Ok(term)
}

fn repeated(labels: &[Label]) -> Option<(usize, usize)> {
    (0..labels.len()).find_map(|i| (i + 1..labels.len()).find(|&j| labels[j] == labels[i]).map(|j| (i, j)))
}

/// Sums away the axes whose labels `keep` does not hold.
fn sum_unused(mut term: Term, keep: &[Label]) -> Result<Term> {
    for a in (0..term.labels.len()).rev() {
        if !keep.contains(&term.labels[a]) {
            term.t = term.t.sum(a)?;
            term.labels.remove(a);
        }
    }
    Ok(term)
}

fn permute_to(term: &Term, order: &[Label]) -> Result<Tensor> {
    let perm: Vec<usize> = order.iter().filter_map(|l| term.labels.iter().position(|m| m == l)).collect();
    Ok(term.t.permute(perm.as_slice())?)
}

/// Contracts two operands: labels in both and still needed are batch axes, labels in both and not needed
/// are summed by the matmul, the rest are kept as rows (a) and columns (b). Size-1 axes broadcast.
fn contract(node: &NodeProto, a: Term, b: Term, keep: &[Label]) -> Result<Term> {
    let both: Vec<Label> = a.labels.iter().copied().filter(|l| b.labels.contains(l)).collect();
    let batch: Vec<Label> = both.iter().copied().filter(|l| keep.contains(l)).collect();
    let inner: Vec<Label> = both.iter().copied().filter(|l| !keep.contains(l)).collect();
    let rows: Vec<Label> = a.labels.iter().copied().filter(|l| !both.contains(l)).collect();
    let cols: Vec<Label> = b.labels.iter().copied().filter(|l| !both.contains(l)).collect();
    let size = |l: Label| -> Result<usize> {
        let da = a.labels.iter().position(|&m| m == l).map_or(1, |p| a.t.dims()[p]);
        let db = b.labels.iter().position(|&m| m == l).map_or(1, |p| b.t.dims()[p]);
        match (da, db) {
            (x, y) if x == y || y == 1 => Ok(x),
            (1, y) => Ok(y),
            (x, y) => {
                Err(node_err(node, format!("label `{}` has size {x} in one operand and {y} in the other", shown(l))))
            }
        }
    };
    let dims = |ls: &[Label]| ls.iter().map(|&l| size(l)).collect::<Result<Vec<usize>>>();
    let (bd, rd, kd, cd) = (dims(&batch)?, dims(&rows)?, dims(&inner)?, dims(&cols)?);
    let prod = |d: &[usize]| d.iter().product::<usize>();
    let order_a: Vec<Label> = batch.iter().chain(&rows).chain(&inner).copied().collect();
    let order_b: Vec<Label> = batch.iter().chain(&inner).chain(&cols).copied().collect();
    let full_a: Vec<usize> = bd.iter().chain(&rd).chain(&kd).copied().collect();
    let full_b: Vec<usize> = bd.iter().chain(&kd).chain(&cd).copied().collect();
    let ta = permute_to(&a, &order_a)?.broadcast_as(full_a.as_slice())?.contiguous()?;
    let tb = permute_to(&b, &order_b)?.broadcast_as(full_b.as_slice())?.contiguous()?;
    let ta = ta.reshape((prod(&bd), prod(&rd), prod(&kd)))?;
    let tb = tb.reshape((prod(&bd), prod(&kd), prod(&cd)))?;
    let y = ta.matmul(&tb)?;
    let shape: Vec<usize> = bd.iter().chain(&rd).chain(&cd).copied().collect();
    let labels = batch.iter().chain(&rows).chain(&cols).copied().collect();
    Ok(Term { t: y.reshape(shape.as_slice())?, labels })
}

/// ONNX Einsum over `xs` with `equation`.
pub fn einsum(node: &NodeProto, equation: &str, xs: &[&Tensor]) -> Result<Tensor> {
    let ranks: Vec<usize> = xs.iter().map(|t| t.rank()).collect();
    let (labels, out) = parse(node, equation, &ranks)?;
    if let Some(l) = out.iter().find(|l| !labels.iter().flatten().any(|m| m == *l)) {
        return Err(node_err(node, format!("output label `{}` is not in any operand", shown(*l))));
    }
    let dtype = xs.first().map(|t| t.dtype()).unwrap_or(DType::F32);
    // Integer operands are contracted in float64 (candle's matmul is float-only) and cast back.
    let work = if matches!(dtype, DType::F32 | DType::F64 | DType::F16 | DType::BF16) { dtype } else { DType::F64 };
    let mut terms = Vec::new();
    for (t, l) in xs.iter().zip(labels) {
        terms.push(diagonal(node, Term { t: t.to_dtype(work)?, labels: l })?);
    }
    // Labels needed after operand i: the output's and those of the operands after it.
    let needed_after = |i: usize, terms: &[Term]| -> Vec<Label> {
        out.iter().copied().chain(terms[i + 1..].iter().flat_map(|t| t.labels.iter().copied())).collect()
    };
    let mut acc: Option<Term> = None;
    for i in 0..terms.len() {
        let keep = needed_after(i, &terms);
        let term = Term { t: terms[i].t.clone(), labels: terms[i].labels.clone() };
        acc = Some(match acc {
            None => sum_unused(term, &keep)?,
            Some(a) => {
                let a = sum_unused(a, &[keep.as_slice(), &term.labels].concat())?;
                let term = sum_unused(term, &[keep.as_slice(), &a.labels].concat())?;
                contract(node, a, term, &keep)?
            }
        });
    }
    let acc = sum_unused(acc.ok_or_else(|| node_err(node, "no operands"))?, &out)?;
    Ok(permute_to(&acc, &out)?.contiguous()?.to_dtype(dtype)?)
}
