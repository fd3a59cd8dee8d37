//! A sampler run written down as a program, for callers that own the loop.
//!
//! A diffusers pipeline calls the network itself and hands each output to
//! `scheduler.step`. Every fixed-grid sampler's control flow depends only on the schedule
//! and the grid, never on tensor values, so running it once on the [`Recorder`] backend
//! (whose handles are register numbers) yields the complete list of operations: network
//! calls, linear combinations with their f64 coefficients, noise draws and clamps. The
//! scheduler then replays that list between network calls ([`Program::run_until_model`]).
//! The same sampler functions produce the program and drive the CLI, so the two cannot
//! drift. Adaptive solvers read error norms back and cannot be recorded.

use anyhow::{Result, bail};

use crate::exec::{Backend, Coef, Ctx, Parameterization, Tolerance, X0Clip};
use crate::samplers::{Options, Sampler};
use crate::schedule::Schedule;

/// A register of the program.
pub type Reg = usize;

/// One operation.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// `out ← network(x, t)` (the raw prediction; one entry of `t` for the whole batch).
    Model { x: Reg, t: f64, out: Reg },
    /// `out ← Σ_k c_k · regs[r_k]`.
    Lincomb { out: Reg, terms: Vec<(f64, Reg)> },
    /// `out ← N(0, I)` shaped like `regs[like]`.
    Noise { out: Reg, like: Reg },
    /// `out ← clamp(regs[x], −limit, limit)`.
    Clamp { out: Reg, x: Reg, limit: f64 },
    /// `out ← regs[x]` dynamically thresholded per row ([`crate::exec::X0Clip::Threshold`]).
    Threshold {
        out: Reg,
        x: Reg,
        ratio: f64,
        max: f64,
    },
    /// The sampler starts step `i` at time `t` in state `x`.
    Begin { i: usize, t: f64, x: Reg },
}

/// A recorded sampler run: register 0 holds the start state, `output` the result.
#[derive(Clone, Debug)]
pub struct Program {
    pub ops: Vec<Op>,
    pub registers: usize,
    pub output: Reg,
    /// Model evaluations per sample.
    pub nfe: f64,
    /// For each register, the index of the last op that reads it (`None`: never read, or
    /// only the output).
    pub last_use: Vec<Option<usize>>,
}

/// The backend that records instead of computing.
#[derive(Default)]
pub struct Recorder {
    ops: Vec<Op>,
    next: Reg,
}

impl Recorder {
    fn fresh(&mut self) -> Reg {
        self.next += 1;
        self.next - 1
    }
}

impl Backend for Recorder {
    type X = Reg;

    fn predict(&mut self, x: &Reg, t: &[f64], _step: usize) -> Result<Reg> {
        if t.len() != 1 {
            bail!(
                "a recorded program has one time per network call (got {})",
                t.len()
            );
        }
        let out = self.fresh();
        self.ops.push(Op::Model {
            x: *x,
            t: t[0],
            out,
        });
        Ok(out)
    }

    fn lincomb(&mut self, terms: &[(Coef, &Reg)]) -> Result<Reg> {
        let mut v = Vec::with_capacity(terms.len());
        for (c, r) in terms {
            match c {
                Coef::All(c) => v.push((*c, **r)),
                Coef::Rows(_) => bail!("a recorded program has batch-wide coefficients only"),
            }
        }
        let out = self.fresh();
        self.ops.push(Op::Lincomb { out, terms: v });
        Ok(out)
    }

    fn noise(&mut self, like: &Reg) -> Result<Reg> {
        let out = self.fresh();
        self.ops.push(Op::Noise { out, like: *like });
        Ok(out)
    }

    fn clamp(&mut self, x: &Reg, limit: f64) -> Result<Reg> {
        let out = self.fresh();
        self.ops.push(Op::Clamp { out, x: *x, limit });
        Ok(out)
    }

    fn threshold(&mut self, x: &Reg, ratio: f64, max: f64) -> Result<Reg> {
        let out = self.fresh();
        self.ops.push(Op::Threshold {
            out,
            x: *x,
            ratio,
            max,
        });
        Ok(out)
    }

    fn error_norm(
        &mut self,
        _e: &Reg,
        _a: &Reg,
        _b: &Reg,
        _rtol: f64,
        _atol: f64,
        _kind: Tolerance,
    ) -> Result<Vec<f64>> {
        bail!(
            "an adaptive solver chooses its steps from the tensors' values and cannot be written down as a fixed program"
        )
    }

    fn begin_step(&mut self, i: usize, t: f64, x: &Reg) -> Result<()> {
        self.ops.push(Op::Begin { i, t, x: *x });
        Ok(())
    }
}

impl Program {
    /// Records `sampler` over the grid `ts` (from `ts[0]` to the end) for a network that
    /// predicts `param`, with optional `clip_sample` or dynamic thresholding ([`X0Clip`]).
    pub fn record(
        schedule: &dyn Schedule,
        sampler: Sampler,
        opts: &Options,
        ts: &[f64],
        param: Parameterization,
        clip: Option<X0Clip>,
    ) -> Result<Program> {
        if sampler.is_adaptive() {
            bail!(
                "sampler {sampler} is adaptive (its steps depend on the tensors' values), so it has no fixed list of network calls; run it with qtaylor.torch.sample"
            );
        }
        let mut rec = Recorder {
            ops: Vec::new(),
            next: 1,
        };
        let (output, nfe) = {
            let mut ctx = Ctx::new(&mut rec, schedule, param, clip, 1);
            let out = crate::samplers::run(&mut ctx, sampler, opts, ts, 0)?;
            (out, ctx.nfe())
        };
        let mut p = Program {
            ops: rec.ops,
            registers: rec.next,
            output,
            nfe,
            last_use: Vec::new(),
        };
        p.eliminate_dead_code();
        Ok(p)
    }

    /// Registers an op reads.
    pub fn reads(op: &Op) -> Vec<Reg> {
        match op {
            Op::Model { x, .. } => vec![*x],
            Op::Lincomb { terms, .. } => terms.iter().map(|t| t.1).collect(),
            // the draw is shaped like `like`: the replay reads it
            Op::Noise { like, .. } => vec![*like],
            Op::Clamp { x, .. } | Op::Threshold { x, .. } => vec![*x],
            Op::Begin { x, .. } => vec![*x],
        }
    }

    fn writes(op: &Op) -> Option<Reg> {
        match op {
            Op::Model { out, .. }
            | Op::Lincomb { out, .. }
            | Op::Noise { out, .. }
            | Op::Clamp { out, .. }
            | Op::Threshold { out, .. } => Some(*out),
            Op::Begin { .. } => None,
        }
    }

    /// Drops combinations and clamps whose result is never read (e.g. ε̂ for a sampler
    /// that uses only x̂0), then records each register's last reader. Network calls and
    /// noise draws are kept (they define the NFE and the order of random draws).
    fn eliminate_dead_code(&mut self) {
        let mut live = vec![false; self.registers];
        live[self.output] = true;
        let mut keep = vec![true; self.ops.len()];
        for (j, op) in self.ops.iter().enumerate().rev() {
            let pure = matches!(
                op,
                Op::Lincomb { .. } | Op::Clamp { .. } | Op::Threshold { .. }
            );
            if pure
                && let Some(w) = Self::writes(op)
                && !live[w]
            {
                keep[j] = false;
                continue;
            }
            if matches!(op, Op::Begin { .. }) {
                continue; // reading for a callback does not keep a value alive
            }
            for r in Self::reads(op) {
                live[r] = true;
            }
        }
        let ops: Vec<Op> = self
            .ops
            .drain(..)
            .zip(keep)
            .filter_map(|(op, k)| k.then_some(op))
            .collect();
        self.ops = ops;
        self.last_use = vec![None; self.registers];
        for (j, op) in self.ops.iter().enumerate() {
            for r in Self::reads(op) {
                self.last_use[r] = Some(j);
            }
        }
    }

    /// The network calls in order: `(op index, time)`.
    pub fn model_calls(&self) -> Vec<(usize, f64)> {
        self.ops
            .iter()
            .enumerate()
            .filter_map(|(j, op)| match op {
                Op::Model { t, .. } => Some((j, *t)),
                _ => None,
            })
            .collect()
    }

    /// Executes ops from `from` on `backend` until the next network call (whose index is
    /// returned) or the end (`None`). Registers are freed after their last reader.
    pub fn run_until_model<B: Backend>(
        &self,
        backend: &mut B,
        regs: &mut [Option<B::X>],
        from: usize,
    ) -> Result<Option<usize>> {
        let get = |regs: &[Option<B::X>], r: Reg| -> Result<B::X> {
            match &regs[r] {
                Some(v) => Ok(v.clone()),
                None => bail!("program register {r} read before it was written"),
            }
        };
        for j in from..self.ops.len() {
            let op = &self.ops[j];
            match op {
                Op::Model { .. } => return Ok(Some(j)),
                Op::Lincomb { out, terms } => {
                    let vals: Vec<(Coef, B::X)> = terms
                        .iter()
                        .map(|&(c, r)| Ok((Coef::All(c), get(regs, r)?)))
                        .collect::<Result<_>>()?;
                    let refs: Vec<(Coef, &B::X)> =
                        vals.iter().map(|(c, x)| (c.clone(), x)).collect();
                    regs[*out] = Some(backend.lincomb(&refs)?);
                }
                Op::Noise { out, like } => {
                    let like = get(regs, *like)?;
                    regs[*out] = Some(backend.noise(&like)?);
                }
                Op::Clamp { out, x, limit } => {
                    let x = get(regs, *x)?;
                    regs[*out] = Some(backend.clamp(&x, *limit)?);
                }
                Op::Threshold { out, x, ratio, max } => {
                    let x = get(regs, *x)?;
                    regs[*out] = Some(backend.threshold(&x, *ratio, *max)?);
                }
                Op::Begin { i, t, x } => {
                    let x = get(regs, *x)?;
                    backend.begin_step(*i, *t, &x)?;
                }
            }
            self.free_after(regs, j);
        }
        Ok(None)
    }

    /// Frees the registers whose last reader is op `j` (the output is kept).
    pub fn free_after<X>(&self, regs: &mut [Option<X>], j: usize) {
        for r in Self::reads(&self.ops[j]) {
            if self.last_use[r] == Some(j) && r != self.output {
                regs[r] = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::VpLinear;

    /// The recorded x̂0 treatment sits after every network call and before anything reads
    /// x̂0: one threshold (or clamp) per call, and the replay hands it to the backend.
    #[test]
    fn thresholding_is_recorded_after_every_network_call() {
        let sched = VpLinear::default();
        let ts = [1.0, 0.6, 0.3, 1e-3];
        let sampler: Sampler = "dpmpp-2m".parse().unwrap();
        let clip = Some(X0Clip::Threshold {
            ratio: 0.995,
            max: 1.0,
        });
        let p = Program::record(
            &sched,
            sampler,
            &Options::default(),
            &ts,
            Parameterization::Eps,
            clip,
        )
        .unwrap();
        let calls = p
            .ops
            .iter()
            .filter(|o| matches!(o, Op::Model { .. }))
            .count();
        let thresholds: Vec<usize> = p
            .ops
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, Op::Threshold { ratio, max, .. } if *ratio == 0.995 && *max == 1.0))
            .map(|(j, _)| j)
            .collect();
        assert_eq!(calls, 3);
        assert_eq!(thresholds.len(), calls);
        // each threshold reads the x̂0 built from the call just before it
        for &j in &thresholds {
            let model = p.ops[..j]
                .iter()
                .rposition(|o| matches!(o, Op::Model { .. }))
                .unwrap();
            let Op::Model { out, .. } = p.ops[model] else {
                unreachable!()
            };
            let Op::Threshold { x, .. } = p.ops[j] else {
                unreachable!()
            };
            let builds_x = p.ops[model..j].iter().any(
                |o| matches!(o, Op::Lincomb { out: w, terms } if *w == x && terms.iter().any(|t| t.1 == out)),
            );
            assert!(
                builds_x,
                "threshold at op {j} does not read the x̂0 of the call at op {model}"
            );
        }
        // without thresholding: no such op
        let plain = Program::record(
            &sched,
            sampler,
            &Options::default(),
            &ts,
            Parameterization::Eps,
            None,
        )
        .unwrap();
        assert!(!plain.ops.iter().any(|o| matches!(o, Op::Threshold { .. })));
    }
}
