//! Data-parallel training: the sum of a flat vector over replicas (an all-reduce).
//!
//! `qtaylor train --devices D1,…,DR` runs R replicas, one thread per device, that hold the same
//! weights and optimiser state. Step k's global batch (the B images, timesteps and noise of a
//! one-device run: functions of (seed, k) only) is cut into R equal consecutive slices, and
//! replica r computes the mean loss of slice r and its gradient g_r. Then
//!
//! ```text
//!     g = (1/R) Σ_r g_r = ∇ (1/B) Σ_{j<B} ℓ_j          (the slices have B/R rows each)
//! ```
//!
//! is the gradient of the global batch's mean loss: every replica applies the same clipped
//! AdamW step to the same state and the replicas stay identical. Only the order of the
//! floating-point sums differs from one device, so a data-parallel run follows the one-device
//! run at the same global batch to rounding, checkpoints keep the one-device format, and a run
//! resumes on any number of devices.
//!
//! The sum Σ_r: on CUDA, NCCL's all-reduce (cudarc's bindings, one communicator rank per GPU,
//! created with `ncclCommInitRank` on the device's candle stream, so it is ordered with the
//! backward pass); on the CPU, a host all-reduce that adds the replicas' vectors in rank order
//! (deterministic). Before every NCCL call the replicas meet at a host rendezvous, which fails
//! at once when another replica has failed: one replica's error ends the run with that error
//! instead of leaving the others waiting inside NCCL.

use std::sync::{Arc, Condvar, Mutex};

use anyhow::{Result, bail};
use candle_core::{Device, Tensor};

/// The host side of R replicas: a reusable rendezvous where each replica hands in an f64
/// vector and receives the sum of all of them (training's CPU replicas and data-parallel
/// tuning use it as their all-reduce), and the first failure, which every later exchange reports.
pub struct Group {
    world: usize,
    round: Mutex<Round>,
    turned: Condvar,
}

#[derive(Default)]
struct Round {
    generation: u64,
    slots: Vec<Option<Vec<f64>>>,
    sum: Arc<Vec<f64>>,
    failed: Option<(usize, String)>,
}

impl Group {
    pub fn new(world: usize) -> Self {
        assert!(world > 0, "a group has at least one replica");
        Group {
            world,
            round: Mutex::new(Round {
                slots: vec![None; world],
                ..Round::default()
            }),
            turned: Condvar::new(),
        }
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Replica `rank`'s `v` in, Σ_r v_r (added in rank order) out, once every replica has
    /// handed its vector in. An error when a replica has failed (before or while waiting) or
    /// the lengths differ.
    pub fn exchange(&self, rank: usize, v: Vec<f64>) -> Result<Arc<Vec<f64>>> {
        let mut r = self.round.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((who, why)) = &r.failed {
            bail!("replica {who} failed: {why}");
        }
        r.slots[rank] = Some(v);
        if r.slots.iter().all(Option::is_some) {
            let vs: Vec<Vec<f64>> = r
                .slots
                .iter_mut()
                .map(|s| s.take().expect("all in"))
                .collect();
            let n = vs[0].len();
            if let Some((k, v)) = vs.iter().enumerate().find(|(_, v)| v.len() != n) {
                let why = format!("replica {k} handed in {} numbers, replica 0 {n}", v.len());
                r.failed = Some((k, why.clone()));
                self.turned.notify_all();
                bail!("{why}");
            }
            let mut sum = vs[0].clone();
            for v in &vs[1..] {
                for (s, x) in sum.iter_mut().zip(v) {
                    *s += x;
                }
            }
            r.sum = Arc::new(sum);
            r.generation += 1;
            self.turned.notify_all();
            return Ok(r.sum.clone());
        }
        let mine = r.generation;
        while r.generation == mine && r.failed.is_none() {
            r = self.turned.wait(r).unwrap_or_else(|p| p.into_inner());
        }
        if r.generation == mine {
            let (who, why) = r.failed.clone().expect("woken by a failure");
            bail!("replica {who} failed: {why}");
        }
        Ok(r.sum.clone())
    }

    /// The replica that failed first, if any.
    pub fn first_failure(&self) -> Option<usize> {
        let r = self.round.lock().unwrap_or_else(|p| p.into_inner());
        r.failed.as_ref().map(|f| f.0)
    }

    /// A guard that marks replica `rank` failed if its thread unwinds (panics) while it lives,
    /// so that the other replicas do not wait for it forever.
    pub fn on_panic(&self, rank: usize) -> PanicGuard<'_> {
        PanicGuard { group: self, rank }
    }

    /// Replica `rank` failed with `why`: every replica waiting now or later gets an error.
    pub fn fail(&self, rank: usize, why: &str) {
        let mut r = self.round.lock().unwrap_or_else(|p| p.into_inner());
        if r.failed.is_none() {
            r.failed = Some((rank, why.lines().next().unwrap_or_default().to_string()));
        }
        self.turned.notify_all();
    }
}

/// Runs `replica(rank, device, group)` for every device at once, one thread each, sharing one
/// [`Group`] of `devices.len()` replicas. A replica that fails or panics marks the group
/// failed, which releases the others from their next exchange. Returns replica 0's result,
/// or the error of the replica that failed first (the others only saw its failure), naming
/// it and its device when there are several.
pub fn run_replicas<T: Send>(
    devices: &[Device],
    replica: impl Fn(usize, &Device, &Group) -> Result<T> + Sync,
) -> Result<T> {
    let group = Group::new(devices.len());
    let mut results: Vec<Result<T>> = std::thread::scope(|scope| {
        let handles: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(rank, device)| {
                let (group, replica) = (&group, &replica);
                scope.spawn(move || {
                    let _release = group.on_panic(rank);
                    let r = replica(rank, device, group);
                    if let Err(e) = &r {
                        group.fail(rank, &format!("{e:#}"));
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("a replica panicked")))
            .collect()
    });
    let first = group.first_failure().unwrap_or(0);
    match results.swap_remove(first) {
        Err(e) if devices.len() > 1 => {
            Err(e.context(format!("replica {first} on {:?}", devices[first])))
        }
        r => r,
    }
}

/// See [`Group::on_panic`].
pub struct PanicGuard<'a> {
    group: &'a Group,
    rank: usize,
}

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.group.fail(self.rank, "it panicked");
        }
    }
}

/// Replica `rank`'s view of the sum over replicas.
pub enum Reducer<'a> {
    /// Not data parallel (plain `train`): no exchange at all.
    One,
    /// Replicas on the CPU: [`Group::exchange`].
    Host { group: &'a Group, rank: usize },
    /// Replicas on GPUs: NCCL, after a host rendezvous.
    #[cfg(feature = "nccl")]
    Nccl {
        group: &'a Group,
        rank: usize,
        comm: nccl::Comm,
    },
}

impl<'a> Reducer<'a> {
    /// Replica `rank` of `group` on `device`. `nccl_id` is the NCCL id every CUDA replica of
    /// the group shares (from [`new_nccl_id`]).
    pub fn new(
        group: &'a Group,
        rank: usize,
        device: &Device,
        nccl_id: Option<NcclId>,
    ) -> Result<Self> {
        match device {
            Device::Cpu => Ok(Reducer::Host { group, rank }),
            #[cfg(feature = "nccl")]
            Device::Cuda(d) => {
                let Some(id) = nccl_id else {
                    bail!("replica {rank} on {device:?}: no NCCL id")
                };
                let comm = nccl::Comm::new(d, rank, group.world(), id)?;
                Ok(Reducer::Nccl { group, rank, comm })
            }
            _ => {
                let _ = nccl_id;
                qtaylor_core::bail_option!(
                    qtaylor_core::keys::DEVICES,
                    ": data-parallel training on GPUs needs NCCL; this binary was built without it (build it with scripts/build-cuda.sh --cudnn --nccl)"
                )
            }
        }
    }

    /// The group and this replica's rank in it (none when not data parallel).
    fn member(&self) -> Option<(&Group, usize)> {
        match self {
            Reducer::One => None,
            Reducer::Host { group, rank } => Some((group, *rank)),
            #[cfg(feature = "nccl")]
            Reducer::Nccl { group, rank, .. } => Some((group, *rank)),
        }
    }

    pub fn world(&self) -> usize {
        self.member().map_or(1, |(g, _)| g.world())
    }

    pub fn rank(&self) -> usize {
        self.member().map_or(0, |(_, r)| r)
    }

    /// Σ_r x_r of a flat f32 vector `x` on this replica's device, on the same device.
    pub fn sum(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Reducer::One => Ok(x.clone()),
            Reducer::Host { group, rank } => {
                let v = x.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
                let s = group.exchange(*rank, v)?;
                Ok(Tensor::from_slice(&s, s.len(), x.device())?.to_dtype(x.dtype())?)
            }
            #[cfg(feature = "nccl")]
            Reducer::Nccl { group, rank, comm } => {
                group.exchange(*rank, Vec::new())?;
                comm.sum(x)
            }
        }
    }

    /// Whether any replica's `flag` is set (a host rendezvous of all replicas).
    pub fn any(&self, flag: bool) -> Result<bool> {
        match self.member() {
            None => Ok(flag),
            Some((group, rank)) => {
                Ok(group.exchange(rank, vec![f64::from(u8::from(flag))])?[0] > 0.0)
            }
        }
    }
}

/// The id that names one NCCL communicator (`ncclGetUniqueId`), shared by its ranks.
#[cfg(feature = "nccl")]
pub type NcclId = candle_core::cuda_backend::cudarc::nccl::Id;
/// Without NCCL there is no id.
#[cfg(not(feature = "nccl"))]
pub type NcclId = ();

/// A fresh NCCL id when `devices` are GPUs (and the binary has NCCL), else none.
pub fn new_nccl_id(devices: &[Device]) -> Result<Option<NcclId>> {
    if !devices.iter().all(Device::is_cuda) {
        return Ok(None);
    }
    #[cfg(feature = "nccl")]
    {
        let id = NcclId::new().map_err(|e| anyhow::anyhow!("NCCL: ncclGetUniqueId: {e:?}"))?;
        Ok(Some(id))
    }
    #[cfg(not(feature = "nccl"))]
    Ok(None)
}

#[cfg(feature = "nccl")]
mod nccl {
    use anyhow::Result;
    use candle_core::cuda_backend::cudarc::nccl::{self as cn, ReduceOp};
    use candle_core::cuda_backend::{CudaDevice, CudaStorage};
    use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

    /// One rank of an NCCL communicator on a candle device's stream.
    pub struct Comm(cn::Comm);

    impl Comm {
        pub fn new(d: &CudaDevice, rank: usize, world: usize, id: cn::Id) -> Result<Self> {
            let stream = d.cuda_stream();
            stream
                .context()
                .bind_to_thread()
                .map_err(|e| anyhow::anyhow!("CUDA: binding rank {rank}'s device: {e:?}"))?;
            let c = cn::Comm::from_rank(stream, rank, world, id).map_err(|e| {
                anyhow::anyhow!("NCCL: ncclCommInitRank (rank {rank} of {world}): {e:?}")
            })?;
            Ok(Comm(c))
        }

        /// The all-reduce sum of a flat f32 tensor, out of place, on the tensor's stream.
        pub fn sum(&self, x: &Tensor) -> Result<Tensor> {
            Ok(x.contiguous()?.apply_op1_no_bwd(self)?)
        }
    }

    impl CustomOp1 for Comm {
        fn name(&self) -> &'static str {
            "nccl-all-reduce-sum"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("the NCCL all-reduce runs on CUDA tensors only")
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let Some((start, end)) = l.contiguous_offsets() else {
                candle_core::bail!("the NCCL all-reduce needs a contiguous tensor")
            };
            let src = s.as_cuda_slice::<f32>()?.slice(start..end);
            let dev = s.device.clone();
            let mut dst = dev.alloc_zeros::<f32>(end - start)?;
            self.0
                .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                .map_err(|e| candle_core::Error::Msg(format!("NCCL: ncclAllReduce: {e:?}")))?;
            Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_sum_adds_every_replicas_vector_in_rank_order() {
        let g = Group::new(3);
        let sums: Vec<Vec<f64>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|r| {
                    let g = &g;
                    s.spawn(move || {
                        let mut out = Vec::new();
                        for round in 0..50 {
                            let v = vec![r as f64 + round as f64, 1.0];
                            out.extend(g.exchange(r, v).unwrap().iter().copied());
                        }
                        out
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want: Vec<f64> = (0..50)
            .flat_map(|round| [3.0 + 3.0 * round as f64, 3.0])
            .collect();
        for s in &sums {
            assert_eq!(s, &want);
        }
    }

    #[test]
    fn a_failed_replica_releases_the_waiting_ones_with_its_error() {
        let g = Group::new(3);
        let errs: Vec<String> = std::thread::scope(|s| {
            let waiting: Vec<_> = (0..2)
                .map(|r| {
                    let g = &g;
                    s.spawn(move || g.exchange(r, vec![1.0]).unwrap_err().to_string())
                })
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(50));
            g.fail(2, "out of memory\nbacktrace");
            waiting.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for e in &errs {
            assert_eq!(e, "replica 2 failed: out of memory");
        }
        // Later exchanges fail too.
        assert!(g.exchange(0, vec![1.0]).is_err());
    }

    #[test]
    fn a_replica_that_panics_releases_the_others() {
        let g = Group::new(2);
        std::thread::scope(|s| {
            let g = &g;
            let waiting = s.spawn(move || g.exchange(0, vec![1.0]).unwrap_err().to_string());
            let panicking = s.spawn(move || {
                let _release = g.on_panic(1);
                std::thread::sleep(std::time::Duration::from_millis(50));
                panic!("boom");
            });
            assert!(panicking.join().is_err());
            assert_eq!(waiting.join().unwrap(), "replica 1 failed: it panicked");
        });
    }

    #[test]
    fn vectors_of_different_lengths_are_an_error_not_a_short_sum() {
        let g = Group::new(2);
        let errs: Vec<bool> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|r| {
                    let g = &g;
                    s.spawn(move || g.exchange(r, vec![1.0; 2 + r]).is_err())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(errs, vec![true, true]);
    }
}
