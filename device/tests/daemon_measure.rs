//! Numbers, not a test: request latency and throughput over the real
//! socket, the copy path, and vhost-user message round trips through the
//! relay. Run with
//! `cargo test --release -p vhost-device-dmabuf --test daemon_measure -- --ignored --nocapture`.

mod vhost_harness;

use std::time::{Duration, Instant};

use vhost::VhostBackend;
use vhost_harness::*;
use virtio_dmabuf_protocol::*;

/// Waits for a chain by spinning (the harness's 1 ms poll would be the
/// measurement otherwise).
fn spin(vm: &mut Vm, sent: Sent) -> Response {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(r) = vm.try_wait(sent) {
            return r;
        }
        assert!(Instant::now() < deadline, "no answer");
        std::hint::spin_loop();
    }
}

fn per_op(total: Duration, n: u32) -> f64 {
    total.as_secs_f64() * 1e6 / f64::from(n)
}

#[test]
#[ignore = "prints measurements; run explicitly"]
fn measure() {
    let d = TestDaemon::start(|c| c.request_queues = 2);
    let mut vm = Vm::connect_with(
        &d.socket(0),
        Options {
            queues: 3,
            regions: vec![(0, 256 << 20)],
            queue_size: 1024,
            ..Options::default()
        },
    );

    // One request at a time.
    let n = 2000;
    let t = Instant::now();
    for _ in 0..n {
        let s = vm.send(0, &Request::GetInfo);
        assert!(spin(&mut vm, s).is_ok());
    }
    let single = t.elapsed();
    println!(
        "GET_INFO, one outstanding: {:.1} us/request",
        per_op(single, n)
    );

    // Batches of 64 per kick.
    let batches = 50;
    let t = Instant::now();
    for _ in 0..batches {
        let sent: Vec<Sent> = (0..64).map(|_| vm.send(0, &Request::GetInfo)).collect();
        for s in sent {
            assert!(spin(&mut vm, s).is_ok());
        }
    }
    let batched = t.elapsed();
    let total = batches * 64;
    println!(
        "GET_INFO, 64 per kick: {:.1} us/request ({:.0} requests/s)",
        per_op(batched, total),
        f64::from(total) / batched.as_secs_f64()
    );

    // The copy path, 1 MiB per request.
    let obj = vm.create(1 << 20).object;
    let data = vec![0xa5u8; 1 << 20];
    let rounds = 50;
    let t = Instant::now();
    for _ in 0..rounds {
        let s = vm.send(
            0,
            &Request::TransferToHost {
                object: obj,
                offset: 0,
                data: data.clone(),
            },
        );
        assert_eq!(spin(&mut vm, s), Ok(Reply::Empty));
    }
    let to = t.elapsed();
    let t = Instant::now();
    for _ in 0..rounds {
        let s = vm.send(
            0,
            &Request::TransferFromHost {
                object: obj,
                offset: 0,
                len: 1 << 20,
            },
        );
        assert!(matches!(spin(&mut vm, s), Ok(Reply::Data(_))));
    }
    let from = t.elapsed();
    let mib_s = |d: Duration| f64::from(rounds) / d.as_secs_f64();
    println!(
        "TRANSFER 1 MiB: to host {:.0} MiB/s, from host {:.0} MiB/s",
        mib_s(to),
        mib_s(from)
    );

    // Lock handover between two queues (park, unlock, completion).
    let (a, b) = (vm.acquire(), vm.acquire());
    let m = 500;
    let t = Instant::now();
    for _ in 0..m {
        let s = vm.send(0, &Vm::lock_request(a, obj));
        assert_eq!(spin(&mut vm, s), Ok(Reply::Empty));
        let parked = vm.send(2, &Vm::lock_request(b, obj));
        let s = vm.send(
            0,
            &Request::Unlock {
                ctx: a,
                object: obj,
            },
        );
        assert_eq!(spin(&mut vm, s), Ok(Reply::Empty));
        assert_eq!(spin(&mut vm, parked), Ok(Reply::Empty));
        let s = vm.send(
            0,
            &Request::Unlock {
                ctx: b,
                object: obj,
            },
        );
        assert_eq!(spin(&mut vm, s), Ok(Reply::Empty));
    }
    println!(
        "LOCK handover (lock, park, unlock, completion, unlock): {:.1} us/cycle",
        per_op(t.elapsed(), m)
    );

    // vhost-user messages through the relay.
    let k = 2000;
    let t = Instant::now();
    for _ in 0..k {
        vm.fe.get_features().expect("GET_FEATURES");
    }
    println!(
        "GET_FEATURES round trip (through the relay): {:.1} us",
        per_op(t.elapsed(), k)
    );

    // MAP_SHM/UNMAP_SHM with the front-end's acks on the back-end channel.
    let w = 500;
    let t = Instant::now();
    for _ in 0..w {
        let s = vm.send(
            0,
            &Request::MapShm {
                object: obj,
                writable: true,
            },
        );
        assert!(matches!(spin(&mut vm, s), Ok(Reply::Shm { .. })));
        let s = vm.send(0, &Request::UnmapShm { object: obj });
        assert_eq!(spin(&mut vm, s), Ok(Reply::Empty));
    }
    println!(
        "MAP_SHM + UNMAP_SHM (two acked back-end messages): {:.1} us/pair",
        per_op(t.elapsed(), w)
    );
    drop(vm);

    // A whole connection: negotiate, memory table, rings, one request, hang up.
    let c = 50;
    let t = Instant::now();
    for _ in 0..c {
        let mut vm = Vm::connect(&d.socket(0));
        let s = vm.send(0, &Request::GetInfo);
        assert!(spin(&mut vm, s).is_ok());
    }
    println!(
        "connect + setup + GET_INFO + disconnect: {:.0} us",
        per_op(t.elapsed(), c)
    );
    d.stop();
}
