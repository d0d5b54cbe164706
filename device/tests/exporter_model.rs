// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Model-based property test: random sequences of operations from two
//! guests and several contexts, run against the exporter core and against
//! a small reference model of the rules (sections 6 to 8). After every step
//! the responses must agree, and `list` must show exactly the locks, pins,
//! attachments and mappings the model allows: nothing outlives its owner.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use vhost_device_dmabuf::exporter::{ExportSpec, HostError, Limits};
use vhost_device_dmabuf::provider::{MemfdProvider, Provider};
use virtio_dmabuf_protocol::*;

const GUESTS: usize = 2;

#[derive(Debug, Clone)]
enum Op {
    Create {
        g: usize,
        dynamic: bool,
        cache: bool,
    },
    OpenShared {
        g: usize,
    },
    Attach {
        g: usize,
        o: usize,
        dynamic: bool,
    },
    Map {
        g: usize,
        a: usize,
        dir: u8,
    },
    Unmap {
        g: usize,
        m: usize,
    },
    Detach {
        g: usize,
        a: usize,
    },
    Pin {
        g: usize,
        a: usize,
        pin: bool,
    },
    Init {
        g: usize,
    },
    Fini {
        g: usize,
        c: usize,
    },
    Lock {
        g: usize,
        c: usize,
        o: usize,
        try_lock: bool,
        slow: bool,
    },
    Unlock {
        g: usize,
        c: usize,
        o: usize,
    },
    Release {
        g: usize,
        o: usize,
    },
    Evict {
        o: usize,
    },
    Reset {
        g: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let g = 0..GUESTS;
    let i = 0usize..4;
    prop_oneof![
        2 => (g.clone(), any::<bool>(), any::<bool>()).prop_map(|(g, dynamic, cache)| Op::Create { g, dynamic, cache: cache && !dynamic }),
        2 => g.clone().prop_map(|g| Op::OpenShared { g }),
        2 => (g.clone(), i.clone(), any::<bool>()).prop_map(|(g, o, dynamic)| Op::Attach { g, o, dynamic }),
        2 => (g.clone(), i.clone(), 0u8..3).prop_map(|(g, a, dir)| Op::Map { g, a, dir }),
        1 => (g.clone(), i.clone()).prop_map(|(g, m)| Op::Unmap { g, m }),
        1 => (g.clone(), i.clone()).prop_map(|(g, a)| Op::Detach { g, a }),
        1 => (g.clone(), i.clone(), any::<bool>()).prop_map(|(g, a, pin)| Op::Pin { g, a, pin }),
        2 => g.clone().prop_map(|g| Op::Init { g }),
        1 => (g.clone(), i.clone()).prop_map(|(g, c)| Op::Fini { g, c }),
        6 => (g.clone(), i.clone(), i.clone(), prop::bool::weighted(0.1), prop::bool::weighted(0.1))
            .prop_map(|(g, c, o, try_lock, slow)| Op::Lock { g, c, o, try_lock, slow }),
        4 => (g.clone(), i.clone(), i.clone()).prop_map(|(g, c, o)| Op::Unlock { g, c, o }),
        1 => (g.clone(), i.clone()).prop_map(|(g, o)| Op::Release { g, o }),
        1 => i.clone().prop_map(|o| Op::Evict { o }),
        1 => g.prop_map(|g| Op::Reset { g }),
    ]
}

// ---- The reference model ----

#[derive(Debug, Clone)]
struct MObj {
    dynamic: bool,
    cache: bool,
    shared: bool,
    uuid: uuid::Uuid,
    /// guest -> (handle, refs)
    handles: BTreeMap<usize, (u64, u32)>,
    holder: Option<u64>,
    /// Waiting contexts, oldest stamp first, with their request token.
    waiters: Vec<(u64, u64)>,
    generation: u64,
}

#[derive(Debug, Clone)]
struct MAtt {
    g: usize,
    obj: usize,
    dynamic: bool,
    cached: Option<u8>,
    pins: u32,
    lifetime_pin: bool,
    mappings: BTreeSet<u64>,
}

#[derive(Debug, Clone)]
struct MCtx {
    g: usize,
    stamp: u64,
    held: BTreeSet<usize>,
    waiting: Option<(usize, u64)>,
}

#[derive(Debug, Default)]
struct Model {
    objs: Vec<Option<MObj>>,
    atts: BTreeMap<u64, MAtt>,
    /// mapping -> (attachment, invalid)
    maps: BTreeMap<u64, (u64, bool)>,
    ctxs: BTreeMap<u64, MCtx>,
    /// Completions the model expects from the next step: token -> status.
    expect: BTreeMap<u64, Status>,
}

impl Model {
    fn live_obj_of(&self, g: usize, sel: usize) -> Option<usize> {
        let mine: Vec<usize> = (0..self.objs.len())
            .filter(|i| {
                self.objs[*i]
                    .as_ref()
                    .is_some_and(|o| o.handles.contains_key(&g))
            })
            .collect();
        (!mine.is_empty()).then(|| mine[sel % mine.len()])
    }

    fn handle(&self, g: usize, obj: usize) -> u64 {
        self.objs[obj].as_ref().unwrap().handles[&g].0
    }

    fn pick<T: Copy>(items: Vec<T>, sel: usize) -> Option<T> {
        (!items.is_empty()).then(|| items[sel % items.len()])
    }

    fn atts_of(&self, g: usize) -> Vec<u64> {
        self.atts
            .iter()
            .filter(|(_, a)| a.g == g)
            .map(|(k, _)| *k)
            .collect()
    }

    fn ctxs_of(&self, g: usize) -> Vec<u64> {
        self.ctxs
            .iter()
            .filter(|(_, c)| c.g == g)
            .map(|(k, _)| *k)
            .collect()
    }

    fn pinned(&self, obj: usize) -> bool {
        self.atts
            .values()
            .any(|a| a.obj == obj && (a.pins > 0 || a.lifetime_pin))
    }

    /// The wait-die queue after a change of `obj`: deaths, then a grant.
    fn settle(&mut self, obj: usize) {
        loop {
            let o = self.objs[obj].as_ref().unwrap();
            let mut oldest = o.holder.map(|h| self.ctxs[&h].stamp);
            let mut dying = Vec::new();
            for (c, t) in &o.waiters {
                let s = self.ctxs[c].stamp;
                if oldest.is_some_and(|x| x < s) && !self.ctxs[c].held.is_empty() {
                    dying.push((*c, *t));
                    continue;
                }
                oldest = Some(oldest.map_or(s, |x| x.min(s)));
            }
            for (c, t) in &dying {
                self.expect.insert(*t, Status::Deadlk);
                self.ctxs.get_mut(c).unwrap().waiting = None;
            }
            let o = self.objs[obj].as_mut().unwrap();
            o.waiters.retain(|w| !dying.contains(w));
            if o.holder.is_some() || o.waiters.is_empty() {
                return;
            }
            let (c, t) = o.waiters.remove(0);
            o.holder = Some(c);
            self.expect.insert(t, Status::Ok);
            let cx = self.ctxs.get_mut(&c).unwrap();
            cx.waiting = None;
            cx.held.insert(obj);
        }
    }

    fn release_lock(&mut self, c: u64, obj: usize) {
        self.ctxs.get_mut(&c).unwrap().held.remove(&obj);
        if let Some(o) = self.objs[obj].as_mut() {
            if o.holder == Some(c) {
                o.holder = None;
            }
        }
        self.settle(obj);
    }

    fn lock_held(&self, obj: usize) -> bool {
        self.objs[obj].as_ref().unwrap().holder.is_some()
    }

    fn maybe_destroy(&mut self, obj: usize) {
        let o = self.objs[obj].as_ref().unwrap();
        if o.handles.is_empty() && !o.shared && !self.atts.values().any(|a| a.obj == obj) {
            self.objs[obj] = None;
        }
    }

    fn reset(&mut self, g: usize) {
        for c in self.ctxs_of(g) {
            if let Some((obj, t)) = self.ctxs[&c].waiting {
                self.expect.insert(t, Status::Canceled);
                self.objs[obj]
                    .as_mut()
                    .unwrap()
                    .waiters
                    .retain(|w| w.0 != c);
                self.ctxs.get_mut(&c).unwrap().waiting = None;
            }
        }
        self.maps.retain(|_, (a, _)| self.atts[a].g != g);
        self.atts.retain(|_, a| a.g != g);
        for c in self.ctxs_of(g) {
            let held: Vec<usize> = self.ctxs[&c].held.iter().copied().collect();
            for obj in held {
                self.release_lock(c, obj);
            }
            self.ctxs.remove(&c);
        }
        for obj in 0..self.objs.len() {
            if let Some(o) = self.objs[obj].as_mut() {
                o.handles.remove(&g);
                self.maybe_destroy(obj);
            }
        }
    }
}

fn dir_of(d: u8) -> Direction {
    Direction::from_u32(u32::from(d)).unwrap()
}

/// Runs one operation on both sides and compares.
fn step(d: &mut Dev, m: &mut Model, op: &Op) -> Result<(), TestCaseError> {
    m.expect.clear();
    let status = |r: &Response| response_status(r);
    match *op {
        Op::Create { g, dynamic, cache } => {
            let r = d.ok(
                g,
                Request::Create {
                    size: PAGE,
                    dynamic,
                    cache_mapping: cache,
                    guest_pages: None,
                },
            );
            let Reply::Object(r) = r else { unreachable!() };
            m.objs.push(Some(MObj {
                dynamic,
                cache,
                shared: false,
                uuid: uuid::Uuid::from_bytes(r.uuid),
                handles: BTreeMap::from([(g, (r.object, 1))]),
                holder: None,
                waiters: vec![],
                generation: 0,
            }));
        }
        Op::OpenShared { g } => {
            let idx = m
                .objs
                .iter()
                .position(|o| o.as_ref().is_some_and(|o| o.shared))
                .unwrap();
            let r = d.ok(
                g,
                Request::Open {
                    uuid: None,
                    name: b"shared".to_vec(),
                },
            );
            let Reply::Object(r) = r else { unreachable!() };
            let o = m.objs[idx].as_mut().unwrap();
            let e = o.handles.entry(g).or_insert((r.object, 0));
            prop_assert_eq!(e.0, r.object, "same handle on reopen");
            e.1 += 1;
        }
        Op::Attach { g, o, dynamic } => {
            let Some(obj) = m.live_obj_of(g, o) else {
                return Ok(());
            };
            if m.lock_held(obj) {
                return Ok(());
            }
            let h = m.handle(g, obj);
            let r = d.call(
                g,
                Request::Attach {
                    object: h,
                    dynamic_importer: dynamic,
                    peer2peer: false,
                },
            );
            let Ok(Reply::Attachment(id)) = r else {
                return Err(TestCaseError::fail(format!("{r:?}")));
            };
            let exp_dyn = m.objs[obj].as_ref().unwrap().dynamic;
            let disagree = exp_dyn != dynamic;
            m.atts.insert(
                id,
                MAtt {
                    g,
                    obj,
                    dynamic,
                    cached: disagree.then_some(0),
                    pins: 0,
                    lifetime_pin: disagree && exp_dyn,
                    mappings: BTreeSet::new(),
                },
            );
        }
        Op::Map { g, a, dir } => {
            let Some(id) = Model::pick(m.atts_of(g), a) else {
                return Ok(());
            };
            let att = m.atts[&id].clone();
            let ctx = if att.dynamic {
                let holding = m
                    .ctxs_of(g)
                    .into_iter()
                    .find(|c| m.ctxs[c].held.contains(&att.obj));
                match holding.or_else(|| m.ctxs_of(g).first().copied()) {
                    Some(c) => c,
                    None => return Ok(()),
                }
            } else {
                if m.lock_held(att.obj) {
                    return Ok(());
                }
                0
            };
            let r = d.call(g, Dev::map_req(id, dir_of(dir), ctx));
            let expected = if ctx != 0 && !m.ctxs[&ctx].held.contains(&att.obj) {
                Status::Perm
            } else if (ctx != 0 && m.ctxs[&ctx].waiting.is_some())
                || att.cached.is_some_and(|c| c != dir && c != 0)
            {
                // A waiting context, or a cached mapping in another direction.
                Status::Busy
            } else {
                Status::Ok
            };
            prop_assert_eq!(status(&r), expected, "{:?}", op);
            if let Ok(Reply::Map(mr)) = r {
                prop_assert_eq!(mr.generation, m.objs[att.obj].as_ref().unwrap().generation);
                m.maps.insert(mr.mapping, (id, false));
                let a = m.atts.get_mut(&id).unwrap();
                a.mappings.insert(mr.mapping);
                let cache = m.objs[att.obj].as_ref().unwrap().cache;
                if a.cached.is_none() && cache {
                    a.cached = Some(dir);
                }
            }
        }
        Op::Unmap { g, m: sel } => {
            let mine: Vec<u64> = m
                .maps
                .iter()
                .filter(|(_, (a, _))| m.atts[a].g == g)
                .map(|(k, _)| *k)
                .collect();
            let Some(id) = Model::pick(mine, sel) else {
                return Ok(());
            };
            let (att, invalid) = m.maps[&id];
            if !invalid && m.lock_held(m.atts[&att].obj) {
                return Ok(());
            }
            prop_assert_eq!(
                d.call(
                    g,
                    Request::Unmap {
                        mapping: id,
                        ctx: 0
                    }
                ),
                Ok(Reply::Empty)
            );
            m.maps.remove(&id);
            m.atts.get_mut(&att).unwrap().mappings.remove(&id);
        }
        Op::Detach { g, a } => {
            let Some(id) = Model::pick(m.atts_of(g), a) else {
                return Ok(());
            };
            let att = m.atts[&id].clone();
            if att.mappings.is_empty() && m.lock_held(att.obj) {
                return Ok(());
            }
            let r = d.call(g, Request::Detach { attachment: id });
            let expected = if att.mappings.is_empty() {
                Status::Ok
            } else {
                Status::Busy
            };
            prop_assert_eq!(status(&r), expected);
            if expected == Status::Ok {
                m.atts.remove(&id);
                m.maybe_destroy(att.obj);
            }
        }
        Op::Pin { g, a, pin } => {
            let Some(id) = Model::pick(m.atts_of(g), a) else {
                return Ok(());
            };
            let att = m.atts[&id].clone();
            let dynamic_exporter = m.objs[att.obj].as_ref().unwrap().dynamic;
            if att.dynamic && dynamic_exporter && m.lock_held(att.obj) {
                return Ok(());
            }
            let req = if pin {
                Request::Pin {
                    attachment: id,
                    ctx: 0,
                }
            } else {
                Request::Unpin {
                    attachment: id,
                    ctx: 0,
                }
            };
            let r = d.call(g, req);
            let expected = if !att.dynamic || (dynamic_exporter && !pin && att.pins == 0) {
                Status::Inval
            } else {
                Status::Ok
            };
            prop_assert_eq!(status(&r), expected, "{:?}", op);
            if expected == Status::Ok && dynamic_exporter {
                let a = m.atts.get_mut(&id).unwrap();
                if pin {
                    a.pins += 1
                } else {
                    a.pins -= 1
                }
            }
        }
        Op::Init { g } => {
            let (ctx, stamp) = d.ctx(g);
            m.ctxs.insert(
                ctx,
                MCtx {
                    g,
                    stamp,
                    held: BTreeSet::new(),
                    waiting: None,
                },
            );
        }
        Op::Fini { g, c } => {
            let Some(ctx) = Model::pick(m.ctxs_of(g), c) else {
                return Ok(());
            };
            let r = d.call(g, Request::AcquireFini { ctx });
            if !m.ctxs[&ctx].held.is_empty() {
                prop_assert_eq!(status(&r), Status::Busy);
            } else {
                prop_assert_eq!(status(&r), Status::Ok);
                if let Some((obj, t)) = m.ctxs[&ctx].waiting {
                    m.expect.insert(t, Status::Canceled);
                    m.objs[obj].as_mut().unwrap().waiters.retain(|w| w.0 != ctx);
                    m.settle(obj);
                }
                m.ctxs.remove(&ctx);
            }
        }
        Op::Lock {
            g,
            c,
            o,
            try_lock,
            slow,
        } => {
            let Some(ctx) = Model::pick(m.ctxs_of(g), c) else {
                return Ok(());
            };
            let Some(obj) = m.live_obj_of(g, o) else {
                return Ok(());
            };
            let h = m.handle(g, obj);
            let (token, r) = d.submit(
                g,
                Request::Lock {
                    ctx,
                    object: h,
                    try_lock,
                    slow,
                },
            );
            let cx = m.ctxs[&ctx].clone();
            let ob = m.objs[obj].as_ref().unwrap();
            let older_ahead = ob.holder.is_some_and(|hc| m.ctxs[&hc].stamp < cx.stamp)
                || ob.waiters.iter().any(|(w, _)| m.ctxs[w].stamp < cx.stamp);
            let expected = if slow && !cx.held.is_empty() {
                Some(Status::Inval)
            } else if cx.waiting.is_some() {
                Some(Status::Busy)
            } else if ob.holder == Some(ctx) {
                Some(Status::Already)
            } else if ob.holder.is_none() {
                Some(Status::Ok)
            } else if try_lock {
                Some(Status::Busy)
            } else if !cx.held.is_empty() && older_ahead {
                Some(Status::Deadlk)
            } else {
                None
            };
            prop_assert_eq!(r.as_ref().map(status), expected, "{:?}", op);
            match expected {
                Some(Status::Ok) => {
                    m.objs[obj].as_mut().unwrap().holder = Some(ctx);
                    m.ctxs.get_mut(&ctx).unwrap().held.insert(obj);
                }
                None => {
                    let stamp = cx.stamp;
                    let o = m.objs[obj].as_mut().unwrap();
                    let pos = o
                        .waiters
                        .iter()
                        .position(|(w, _)| m.ctxs[w].stamp > stamp)
                        .unwrap_or(o.waiters.len());
                    o.waiters.insert(pos, (ctx, token));
                    m.ctxs.get_mut(&ctx).unwrap().waiting = Some((obj, token));
                    m.settle(obj);
                }
                _ => {}
            }
        }
        Op::Unlock { g, c, o } => {
            let Some(ctx) = Model::pick(m.ctxs_of(g), c) else {
                return Ok(());
            };
            let Some(obj) = m.live_obj_of(g, o) else {
                return Ok(());
            };
            let h = m.handle(g, obj);
            let r = d.call(g, Request::Unlock { ctx, object: h });
            let cx = &m.ctxs[&ctx];
            let expected = if !cx.held.contains(&obj) {
                Status::Perm
            } else if cx.waiting.is_some() {
                Status::Busy
            } else {
                Status::Ok
            };
            prop_assert_eq!(status(&r), expected);
            if expected == Status::Ok {
                m.release_lock(ctx, obj);
            }
        }
        Op::Release { g, o } => {
            let Some(obj) = m.live_obj_of(g, o) else {
                return Ok(());
            };
            let h = m.handle(g, obj);
            let r = d.call(g, Request::Release { object: h });
            let refs = m.objs[obj].as_ref().unwrap().handles[&g].1;
            let busy = refs == 1
                && (m.atts.values().any(|a| a.g == g && a.obj == obj)
                    || m.ctxs.values().any(|c| {
                        c.g == g && (c.held.contains(&obj) || c.waiting.is_some_and(|w| w.0 == obj))
                    }));
            prop_assert_eq!(status(&r), if busy { Status::Busy } else { Status::Ok });
            if !busy {
                let ob = m.objs[obj].as_mut().unwrap();
                if refs > 1 {
                    ob.handles.get_mut(&g).unwrap().1 -= 1;
                } else {
                    ob.handles.remove(&g);
                    m.maybe_destroy(obj);
                }
            }
        }
        Op::Evict { o } => {
            let live: Vec<usize> = (0..m.objs.len()).filter(|i| m.objs[*i].is_some()).collect();
            let Some(obj) = Model::pick(live, o) else {
                return Ok(());
            };
            let ob = m.objs[obj].clone().unwrap();
            if ob.dynamic && !m.pinned(obj) && ob.holder.is_some() {
                return Ok(());
            }
            let now = d.now;
            let r = d.ex.host_evict(ob.uuid, 1, Duration::from_secs(1), now);
            let expected = if !ob.dynamic {
                Err(HostError::NotDynamic)
            } else if m.pinned(obj) {
                Err(HostError::Pinned)
            } else {
                Ok(())
            };
            prop_assert_eq!(r, Some(expected.clone()));
            if expected.is_ok() {
                m.objs[obj].as_mut().unwrap().generation += 1;
                for (id, a) in &m.atts {
                    if a.obj == obj {
                        for mp in &a.mappings {
                            m.maps.insert(*mp, (*id, true));
                        }
                    }
                }
                while d.ex.pop_event(0).is_some() || d.ex.pop_event(1).is_some() {}
            }
        }
        Op::Reset { g } => {
            d.ok(g, Request::ResetSession);
            m.reset(g);
        }
    }
    // Parked requests that completed in this step are exactly the model's.
    let got: BTreeMap<u64, Status> = d
        .completions()
        .into_iter()
        .map(|c| (c.origin.token, response_status(&c.response)))
        .collect();
    prop_assert_eq!(&got, &m.expect, "completions after {:?}", op);
    check_invariants(d, m)
}

/// What `list` shows must be exactly what the model allows.
fn check_invariants(d: &Dev, m: &Model) -> Result<(), TestCaseError> {
    let list = d.ex.list();
    let live: Vec<&MObj> = m.objs.iter().flatten().collect();
    prop_assert_eq!(list.len(), live.len(), "objects");
    for o in live {
        let info = list
            .iter()
            .find(|i| i.uuid == o.uuid)
            .expect("object in list");
        let guests: Vec<usize> = o.handles.keys().copied().collect();
        prop_assert_eq!(&info.guests, &guests);
        prop_assert_eq!(info.generation, o.generation);
        let stamp = o.holder.map(|c| m.ctxs[&c].stamp);
        prop_assert_eq!(
            info.lock_holder.as_ref().and_then(|h| h.stamp),
            stamp,
            "lock holder"
        );
        let obj_idx = m
            .objs
            .iter()
            .position(|x| x.as_ref().is_some_and(|x| x.uuid == o.uuid))
            .unwrap();
        let mut want: Vec<(usize, u32, Option<u32>, usize)> = m
            .atts
            .values()
            .filter(|a| a.obj == obj_idx)
            .map(|a| {
                (
                    a.g,
                    a.pins + u32::from(a.lifetime_pin),
                    a.cached.map(u32::from),
                    a.mappings.len(),
                )
            })
            .collect();
        let mut have: Vec<(usize, u32, Option<u32>, usize)> = info
            .attachments
            .iter()
            .map(|a| (a.guest, a.pins, a.cached_dir, a.mappings))
            .collect();
        want.sort();
        have.sort();
        prop_assert_eq!(have, want, "attachments of {}", o.uuid);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_operation_sequences_follow_the_rules(ops in prop::collection::vec(op(), 10..80)) {
        let mut d = Dev::with_limits(Limits::default());
        let mut m = Model::default();
        let backing = MemfdProvider::new(1 << 30).allocate(PAGE).unwrap();
        let uuid = d.ex.host_export(
            ExportSpec { name: "shared".into(), dynamic: true, read_only: false, guests: None },
            backing,
        ).unwrap();
        m.objs.push(Some(MObj {
            dynamic: true, cache: false, shared: true, uuid,
            handles: BTreeMap::new(), holder: None, waiters: vec![], generation: 0,
        }));
        for op in &ops {
            step(&mut d, &mut m, op)?;
        }
        // Both guests go away: nothing but the host export is left, unlocked and unattached.
        for g in 0..GUESTS {
            d.ok(g, Request::ResetSession);
            m.reset(g);
        }
        let _ = d.completions();
        let list = d.ex.list();
        prop_assert_eq!(list.len(), 1);
        prop_assert!(list[0].attachments.is_empty() && list[0].lock_holder.is_none() && list[0].guests.is_empty());
    }
}
