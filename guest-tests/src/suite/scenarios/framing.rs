// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The device configuration and the framing of requests (sections 3, 4,
//! 7.1): how chains are cut into descriptors, short and malformed parts,
//! unknown opcodes, reserved bits and addresses outside guest memory.

use virtio_dmabuf_protocol::{
    caps, create_flags, encode_request, Direction, Opcode, Reply, Request, RequestHeader, Status,
    CONFIG_SIZE, CONTROLQ, INFO_SIZE, REQ_HDR_SIZE, RESP_HDR_SIZE,
};

use super::{create, info, page, ram_end, raw_status, Check, Stop, Target};
use crate::driver::{
    begin_cpu_access_request, reply_capacity, BatchItem, ChainLayout, Desc, RawChain,
};
use crate::session::{read_device_config, Session};
use crate::{ensure, ensure_eq};

pub(super) fn config_space_matches_get_info(t: &Target) -> Check {
    let mut vmm = t.connect()?;
    let window = vmm.capabilities().config_window;
    let cfg = read_device_config(&mut *vmm)?;
    let i = info(vmm.driver())?;
    ensure_eq!(i.version, 1);
    ensure!(cfg.num_queues >= 2, "num_queues {}", cfg.num_queues);
    ensure_eq!(i.num_queues, cfg.num_queues);
    ensure_eq!(u64::from(cfg.num_queues), vmm.capabilities().queue_num);
    if window < CONFIG_SIZE as u32 {
        // A stand-in device shows only the first fields (section 1); the
        // rest is checked against GET_INFO alone.
        ensure!(window >= 8, "config window of {window} bytes");
        ensure_eq!(i.page_size, cfg.page_size);
        ensure!(i.page_size >= 4096 && i.page_size.is_power_of_two());
        ensure_eq!(i.caps & caps::HOST_SHM, 0, "a stand-in has no region");
        ensure_eq!(i.shm_size, 0);
        return Ok(());
    }
    ensure!(cfg.page_size >= 4096 && cfg.page_size.is_power_of_two());
    ensure_eq!(i.page_size, cfg.page_size);
    ensure_eq!(i.max_segments, cfg.max_segments);
    // shm_size is what is live: the region when SHMEM and the back-end
    // channel were negotiated, else zero.
    let live = vmm.capabilities().shm_size;
    ensure_eq!(cfg.shm_size, live);
    ensure_eq!(i.shm_size, cfg.shm_size);
    ensure_eq!(i.caps & caps::HOST_SHM != 0, cfg.shm_size != 0);
    // A longer read has the requested size, zero past the structure.
    let long = vmm.read_config(0, 64)?;
    ensure_eq!(long.len(), 64);
    ensure_eq!(&long[..24], &cfg.to_bytes()[..]);
    ensure!(long[24..].iter().all(|&b| b == 0));
    let tail = vmm.read_config(16, 16)?;
    ensure_eq!(&tail[..8], &cfg.to_bytes()[16..24]);
    Ok(())
}

pub(super) fn framing_header_split_across_descriptors(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let bytes = encode_request(0xfeed, &Request::GetInfo);
    for cuts in [&[1usize][..], &[3, 4, 12], &[8], &[15], &[0, 16]] {
        let chain = RawChain::split(&bytes, cuts, &[1, 7, 8, INFO_SIZE as u32]);
        let c = d.complete_raw(d.submit_raw(CONTROLQ, chain)?)?;
        ensure_eq!(
            c.used_len as usize,
            RESP_HDR_SIZE + INFO_SIZE,
            "cuts {cuts:?}"
        );
        let (tag, r) = virtio_dmabuf_protocol::decode_response(Opcode::GetInfo, &c.written)
            .map_err(|e| Stop::Fail(e.to_string()))?;
        ensure_eq!(tag, 0xfeed);
        ensure!(matches!(r, Ok(Reply::Info(_))), "{r:?}");
    }
    // A CREATE whose le64 size is cut in the middle.
    let size = page(d)?;
    let req = Request::Create {
        size,
        dynamic: false,
        cache_mapping: false,
        guest_pages: None,
    };
    let bytes = encode_request(0xbeef, &req);
    let chain = RawChain::split(&bytes, &[REQ_HDR_SIZE + 3], &[10, 46]);
    let c = d.complete_raw(d.submit_raw(CONTROLQ, chain)?)?;
    let r = crate::driver::check_response(Opcode::Create, 0xbeef, &c)?;
    let Ok(Reply::Object(o)) = r else {
        return Err(Stop::Fail(format!("{r:?}")));
    };
    ensure_eq!(o.size, size);
    ensure_eq!(d.release(o.object)?, Ok(()));
    Ok(())
}

pub(super) fn framing_short_writable_part_gets_used_len_0(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let bytes = encode_request(1, &Request::GetInfo);
    for writable in [&[][..], &[15u32][..], &[7, 8]] {
        let mut chain = RawChain::new().readable(bytes.clone());
        for &w in writable {
            chain = chain.writable(w);
        }
        let c = d.complete_raw(d.submit_raw(CONTROLQ, chain)?)?;
        ensure_eq!(c.used_len, 0, "writable {writable:?}");
    }
    // The device keeps serving.
    info(d)?;
    Ok(())
}

pub(super) fn framing_short_parts_are_einval(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    // Readable part shorter than the header: EINVAL, header only.
    let c = d.complete_raw(d.submit_raw(
        CONTROLQ,
        RawChain::new().readable(vec![1, 0, 0]).writable(64),
    )?)?;
    ensure_eq!(c.used_len as usize, RESP_HDR_SIZE);
    ensure_eq!(
        raw_status(&c.written).map(|s| s.0),
        Some(Status::Inval as u32)
    );
    // ATTACH with 4 of its 8 payload bytes: EINVAL, tag echoed.
    let mut bytes = encode_request(
        0x44,
        &Request::Attach {
            object: 1,
            dynamic_importer: false,
            peer2peer: false,
        },
    );
    bytes.truncate(REQ_HDR_SIZE + 4);
    let c =
        d.complete_raw(d.submit_raw(CONTROLQ, RawChain::new().readable(bytes).writable(64))?)?;
    ensure_eq!(c.used_len as usize, RESP_HDR_SIZE);
    ensure_eq!(raw_status(&c.written), Some((Status::Inval as u32, 0x44)));
    // GET_INFO with room for the header but not the 80-byte reply.
    let t2 = d.submit_sized(
        CONTROLQ,
        0x45,
        &Request::GetInfo,
        RESP_HDR_SIZE + INFO_SIZE - 1,
    )?;
    ensure_eq!(d.complete(t2)?, Err(Status::Inval));
    Ok(())
}

pub(super) fn framing_garbage_opcode_in_a_batch_is_enosys(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let garbage = |opcode: u32, tag: u64| {
        let mut b = RequestHeader {
            opcode,
            flags: 0,
            tag,
        }
        .to_bytes()
        .to_vec();
        b.extend_from_slice(&[0xa5; 24]);
        BatchItem::raw(RawChain::new().readable(b).writable(64))
    };
    let size = page(d)?;
    let create = Request::Create {
        size,
        dynamic: false,
        cache_mapping: false,
        guest_pages: None,
    };
    let items = vec![
        d.typed_item(0x10, &Request::GetInfo, reply_capacity(&Request::GetInfo)),
        garbage(0xdead_beef, 0x11),
        d.typed_item(0x12, &create, reply_capacity(&create)),
        garbage(0, 0x13),
        garbage(0x0106, 0x14),
        d.typed_item(0x15, &Request::GetInfo, reply_capacity(&Request::GetInfo)),
    ];
    let tickets = d.submit_batch(CONTROLQ, &items)?;
    let mut object = None;
    for t in tickets {
        let tag = t.tag();
        if t.opcode().is_some() {
            let r = d.complete(t)?;
            if let Ok(Reply::Object(o)) = &r {
                object = Some(o.object);
            }
            ensure!(r.is_ok(), "tag {tag:#x}: {r:?}");
        } else {
            let c = d.complete_raw(t)?;
            ensure_eq!(c.used_len as usize, RESP_HDR_SIZE, "tag {tag:#x}");
            ensure_eq!(raw_status(&c.written), Some((Status::NoSys as u32, tag)));
        }
    }
    if let Some(o) = object {
        ensure_eq!(d.release(o)?, Ok(()));
    }
    Ok(())
}

pub(super) fn framing_flags_reserved_and_enums_are_einval(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let object = create(d, 1, 0)?;
    let send_raw = |bytes: Vec<u8>| -> Result<Option<(u32, u64)>, Stop> {
        let c =
            d.complete_raw(d.submit_raw(CONTROLQ, RawChain::new().readable(bytes).writable(64))?)?;
        ensure_eq!(c.used_len as usize, RESP_HDR_SIZE);
        Ok(raw_status(&c.written))
    };
    let einval = Some((Status::Inval as u32, 0x21));
    // Unknown flag bit on RELEASE.
    let mut b = encode_request(0x21, &Request::Release { object });
    b[4..8].copy_from_slice(&0x80u32.to_le_bytes());
    ensure_eq!(send_raw(b)?, einval);
    // Reserved field of BEGIN_CPU_ACCESS.
    let begin = encode_request(0x21, &begin_cpu_access_request(object, Direction::ToDevice));
    let mut b = begin.clone();
    b[REQ_HDR_SIZE + 12..REQ_HDR_SIZE + 16].copy_from_slice(&1u32.to_le_bytes());
    ensure_eq!(send_raw(b)?, einval);
    // dir = NONE (3).
    let mut b = begin;
    b[REQ_HDR_SIZE + 8..REQ_HDR_SIZE + 12].copy_from_slice(&3u32.to_le_bytes());
    ensure_eq!(send_raw(b)?, einval);
    // DYNAMIC with CACHE_MAPPING, and GUEST_PAGES entries without the flag.
    ensure_eq!(
        d.create(
            page(d)?,
            create_flags::DYNAMIC | create_flags::CACHE_MAPPING
        )?,
        Err(Status::Inval)
    );
    let mut b = encode_request(
        0x21,
        &Request::Create {
            size: page(d)?,
            dynamic: false,
            cache_mapping: false,
            guest_pages: None,
        },
    );
    b[REQ_HDR_SIZE + 8..REQ_HDR_SIZE + 12].copy_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&[0; 16]);
    ensure_eq!(send_raw(b)?, einval);
    // Sizes that are not a non-zero page multiple.
    ensure_eq!(d.create(0, 0)?, Err(Status::Inval));
    ensure_eq!(d.create(page(d)? + 1, 0)?, Err(Status::Inval));
    ensure_eq!(d.release(object)?, Ok(()));
    Ok(())
}

pub(super) fn framing_address_outside_guest_memory(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let ram_end = ram_end(&vmm);
    let far = ram_end + (1 << 30);
    let bytes = encode_request(0x31, &Request::GetInfo);
    // Readable part outside guest memory: EFAULT if the device can answer,
    // else used.len 0; never a crash.
    let chain = RawChain::new()
        .at(Desc {
            addr: far,
            len: 16,
            write: false,
        })
        .writable(96);
    let c = d.complete_raw(d.submit_raw(CONTROLQ, chain)?)?;
    ensure!(
        c.used_len == 0
            || (c.used_len as usize == RESP_HDR_SIZE
                && raw_status(&c.written).map(|s| s.0) == Some(Status::Fault as u32)),
        "used.len {} status {:?}",
        c.used_len,
        raw_status(&c.written)
    );
    // Writable part outside: nothing can be written.
    let chain = RawChain::new().readable(bytes).at(Desc {
        addr: far,
        len: 96,
        write: true,
    });
    let c = d.complete_raw(d.submit_raw(CONTROLQ, chain)?)?;
    ensure_eq!(c.used_len, 0);
    // A range that starts inside and runs past the end.
    let chain = RawChain::new()
        .at(Desc {
            addr: ram_end - 8,
            len: 16,
            write: false,
        })
        .writable(96);
    let c = d.complete_raw(d.submit_raw(CONTROLQ, chain)?)?;
    ensure!(c.used_len == 0 || raw_status(&c.written).map(|s| s.0) == Some(Status::Fault as u32));
    info(d)?;
    Ok(())
}

/// A header in guest RAM followed by a readable descriptor outside it:
/// `EFAULT` with the request's tag (section 4), the chain's writable part
/// written once.
pub(super) fn framing_readable_part_outside_ram_after_the_header_is_efault_with_its_tag(
    t: &Target,
) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let far = ram_end(&vmm) + (1 << 30);
    let chain = RawChain::new()
        .readable(encode_request(0x7a6, &Request::GetInfo))
        .at(Desc {
            addr: far,
            len: 16,
            write: false,
        })
        .writable(96);
    let c = d.complete_raw(d.submit_raw(CONTROLQ, chain)?)?;
    ensure_eq!(
        c.used_len as usize,
        RESP_HDR_SIZE,
        "exactly a response header"
    );
    ensure_eq!(
        raw_status(&c.written),
        Some((Status::Fault as u32, 0x7a6)),
        "EFAULT with the tag echoed"
    );
    info(d)?;
    Ok(())
}

/// A chain whose last descriptor links back to its first never ends: it
/// comes back unread with `used.len` 0, whether its links are in the ring
/// or in an indirect table, and the device keeps serving (section 4).
pub(super) fn framing_chain_that_loops_comes_back_with_used_len_0(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let mut kinds = vec![false];
    if d.config().indirect {
        kinds.push(true);
    }
    for indirect in kinds {
        let chain = RawChain::new()
            .readable(encode_request(0x100b, &Request::GetInfo))
            .writable(96)
            .writable(96)
            .indirect(indirect)
            .looped();
        let c = d.complete_raw(d.submit_raw(CONTROLQ, chain)?)?;
        ensure_eq!(c.used_len, 0, "indirect {indirect}");
        ensure!(
            c.written.iter().all(|&b| b == 0),
            "indirect {indirect}: nothing may be written into a chain that never ends"
        );
    }
    info(d)?;
    Ok(())
}

pub(super) fn requests_survive_any_descriptor_layout(t: &Target) -> Check {
    let vmm = t.connect()?;
    let d = vmm.driver();
    let mut layouts = vec![
        ChainLayout {
            max_desc_len: Some(3),
            first_desc_len: None,
            indirect: false,
        },
        ChainLayout {
            max_desc_len: Some(16),
            first_desc_len: Some(5),
            indirect: false,
        },
    ];
    if d.config().indirect {
        layouts.push(ChainLayout {
            max_desc_len: None,
            first_desc_len: Some(7),
            indirect: true,
        });
        layouts.push(ChainLayout {
            max_desc_len: Some(5),
            first_desc_len: None,
            indirect: true,
        });
    }
    for layout in layouts {
        d.set_chain_layout(layout);
        let object = create(d, 1, 0)?;
        let data: Vec<u8> = (0..40u8).collect();
        ensure_eq!(d.transfer_to_host(object, 8, &data)?, Ok(()), "{layout:?}");
        ensure_eq!(d.transfer_from_host(object, 8, 40)?, Ok(data), "{layout:?}");
        let a = d.attach(object, 0)??;
        let m = d.map(a, Direction::ToDevice, 16, 0)??;
        ensure_eq!(d.unmap(m.mapping, 0)?, Ok(()));
        ensure_eq!(d.detach(a)?, Ok(()));
        ensure_eq!(d.release(object)?, Ok(()));
    }
    Ok(())
}
