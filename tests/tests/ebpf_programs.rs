//! The real eBPF object, loaded into the kernel and attached in a throwaway network
//! namespace, with crafted packets pushed through `BPF_PROG_TEST_RUN`: verdicts, exact
//! output bytes, counters, and what `bpftool` shows of the pinned maps.

use std::{net::Ipv4Addr, process::Command};

use aya::maps::{HashMap, MapData};
use flannel_common::{DropReason, PassReason, maps, names, wire};
use flannel_e2e::progs::{
    LOCAL_IP, Loaded, MF, NOP_OPTIONS, OUR_MAC, PEER_IP, PEER_MAC, PinDir, TC_ACT_OK,
    TC_ACT_REDIRECT, TC_ACT_SHOT, in_fresh_netns, inner_frame, vxlan_packet, with_outer,
};

#[test]
fn encap_builds_the_headers_the_linux_vxlan_driver_builds() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = PinDir::new("encap");
    let pin_path = pins.0.clone();
    in_fresh_netns(move || {
        let mut dp = Loaded::new(&pin_path);
        let inner = inner_frame(PEER_MAC, OUR_MAC, [10, 244, 1, 5], [10, 244, 2, 7]);
        let (verdict, out) = dp.run(names::PROG_ENCAP, &inner);
        assert_eq!(
            verdict, TC_ACT_REDIRECT,
            "encap must redirect to the uplink"
        );
        assert_eq!(out.len(), inner.len() + 50, "VXLAN adds exactly 50 bytes");

        // Outer IPv4.
        let ip: [u8; 20] = out[14..34].try_into().unwrap();
        assert_eq!(&out[12..14], &[0x08, 0x00]);
        assert_eq!(ip[0], 0x45);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, out.len() - 14);
        assert_eq!(ip[6] & 0x40, 0, "DF is clear, like the kernel driver");
        assert_eq!(ip[8], 64);
        assert_eq!(ip[9], 17);
        assert_eq!(&ip[12..16], &LOCAL_IP);
        assert_eq!(&ip[16..20], &PEER_IP);
        let mut zeroed = ip;
        zeroed[10] = 0;
        zeroed[11] = 0;
        assert_eq!(
            wire::ipv4_header_checksum(&zeroed),
            u16::from_be_bytes([ip[10], ip[11]])
        );
        // Outer UDP.
        let sport = u16::from_be_bytes([out[34], out[35]]);
        assert!(
            (32768..61000).contains(&sport),
            "source port {sport} from the flow hash"
        );
        assert_eq!(u16::from_be_bytes([out[36], out[37]]), 8472);
        assert_eq!(
            u16::from_be_bytes([out[38], out[39]]) as usize,
            out.len() - 34
        );
        assert_eq!(
            &out[40..42],
            &[0, 0],
            "outer UDP checksum is zero (GSO-safe)"
        );
        // VXLAN, VNI 1.
        assert_eq!(&out[42..50], &[0x08, 0, 0, 0, 0, 0, 1, 0]);
        // Inner frame: dst = peer VTEP MAC, src = ours, then the original IP packet.
        assert_eq!(&out[50..56], &PEER_MAC);
        assert_eq!(&out[56..62], &OUR_MAC);
        assert_eq!(&out[62..64], &[0x08, 0x00]);
        assert_eq!(&out[64..], &inner[14..], "inner IP packet untouched");

        let stats = dp.peer_stats(3);
        assert_eq!(stats.tx_packets, 1);
        assert_eq!(stats.tx_bytes, inner.len() as u64);
    });
}

#[test]
fn the_decap_l4_udp_probe_answers_as_the_helper_does_on_a_peers_packet() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = PinDir::new("probe");
    let pin_path = pins.0.clone();
    in_fresh_netns(move || {
        let mut dp = Loaded::new(&pin_path);
        // The agent's probe, on its own frame.
        let agent_says = flannel_agent::backend::ebpf::probe_decap_l4_udp(&mut dp.ebpf)
            .expect("the probe runs and answers yes or no");
        // The same program on a known peer's VXLAN packet as the decap tests build it:
        // the helper's own answer, 0 or -EINVAL (length checks come first and would
        // answer -ENOTSUPP, so -EINVAL is the flag).
        dp.load_program(names::PROG_PROBE_DECAP_L4_UDP);
        let inner = inner_frame(OUR_MAC, PEER_MAC, [10, 244, 2, 7], [10, 244, 1, 5]);
        let (answer, _) = dp.run(
            names::PROG_PROBE_DECAP_L4_UDP,
            &vxlan_packet(PEER_IP, 1, &inner),
        );
        let answer = answer as i32;
        assert!(
            answer == 0 || answer == -libc::EINVAL,
            "unexpected answer {answer}"
        );
        assert_eq!(agent_says, answer == 0);
        eprintln!(
            "this kernel {} BPF_F_ADJ_ROOM_DECAP_L4_UDP",
            if agent_says { "offers" } else { "lacks" }
        );
    });
}

#[test]
fn encap_leaves_unrouted_and_non_ip_traffic_to_the_kernel() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = PinDir::new("miss");
    let pin_path = pins.0.clone();
    in_fresh_netns(move || {
        let mut dp = Loaded::new(&pin_path);
        let miss = inner_frame(PEER_MAC, OUR_MAC, [10, 244, 1, 5], [10, 244, 9, 7]);
        let (verdict, out) = dp.run(names::PROG_ENCAP, &miss);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, miss, "a route miss must not touch the packet");
        assert_eq!(dp.counter(names::MAP_PASSES, PassReason::NoRoute as u32), 1);

        let mut arp = miss.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let (verdict, _) = dp.run(names::PROG_ENCAP, &arp);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(dp.counter(names::MAP_PASSES, PassReason::NotIpv4 as u32), 1);
    });
}

/// An IPv6-only host's CONFIG: no `flannel.<VNI>` (index 0) and no IPv4 source. Even
/// with an IPv4 peer in the maps, the IPv4 halves touch nothing: encap passes the packet
/// to the kernel (`not_ipv4`), decap ignores IPv4 VXLAN from a known peer and from a
/// stranger alike (no redirect to index 0, no drop, no counter).
#[test]
fn without_an_ipv4_device_the_ipv4_halves_leave_everything_to_the_kernel() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = PinDir::new("v6only");
    let pin_path = pins.0.clone();
    in_fresh_netns(move || {
        let mut dp = Loaded::new(&pin_path);
        dp.update_config(|c| {
            c.vxlan_ifindex = 0;
            c.vtep_mac = [0; 6];
        });
        let routed = inner_frame(PEER_MAC, OUR_MAC, [10, 244, 1, 5], [10, 244, 2, 7]);
        let (verdict, out) = dp.run(names::PROG_ENCAP, &routed);
        assert_eq!(verdict, TC_ACT_OK, "no IPv4 device: the kernel's packet");
        assert_eq!(out, routed, "untouched");
        assert_eq!(dp.counter(names::MAP_PASSES, PassReason::NotIpv4 as u32), 1);

        let inner = inner_frame(OUR_MAC, PEER_MAC, [10, 244, 2, 7], [10, 244, 1, 5]);
        for src in [PEER_IP, [198, 18, 0, 99]] {
            let packet = vxlan_packet(src, 1, &inner);
            let (verdict, out) = dp.run(names::PROG_DECAP, &packet);
            assert_eq!(verdict, TC_ACT_OK, "from {src:?}: left to the kernel");
            assert_eq!(out, packet, "untouched");
        }
        let stats = dp.peer_stats(3);
        assert_eq!((stats.tx_packets, stats.rx_packets), (0, 0), "{stats:?}");
        assert_eq!(
            dp.counter(names::MAP_DROPS, DropReason::UnknownPeer as u32),
            0
        );
    });
}

#[test]
fn decap_delivers_vxlan_from_known_peers_and_drops_the_rest() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = PinDir::new("decap");
    let pin_path = pins.0.clone();
    in_fresh_netns(move || {
        let mut dp = Loaded::new(&pin_path);
        let inner = inner_frame(OUR_MAC, PEER_MAC, [10, 244, 2, 7], [10, 244, 1, 5]);

        let (verdict, out) = dp.run(names::PROG_DECAP, &vxlan_packet(PEER_IP, 1, &inner));
        assert_eq!(
            verdict, TC_ACT_REDIRECT,
            "known peer: redirected into flannel.1"
        );
        assert_eq!(out, inner, "exactly the inner frame comes out");
        let stats = dp.peer_stats(3);
        assert_eq!(stats.rx_packets, 1);
        assert_eq!(stats.rx_bytes, inner.len() as u64);

        let (verdict, _) = dp.run(
            names::PROG_DECAP,
            &vxlan_packet([198, 18, 0, 99], 1, &inner),
        );
        assert_eq!(
            verdict, TC_ACT_SHOT,
            "VXLAN from an address without a lease is dropped"
        );
        assert_eq!(
            dp.counter(names::MAP_DROPS, DropReason::UnknownPeer as u32),
            1
        );

        let (verdict, _) = dp.run(names::PROG_DECAP, &vxlan_packet(PEER_IP, 2, &inner));
        assert_eq!(verdict, TC_ACT_SHOT, "another VNI is dropped");
        assert_eq!(dp.counter(names::MAP_DROPS, DropReason::BadVni as u32), 1);

        // The peer's host traffic (not masqueraded) has an inner source outside its subnet:
        // the kernel device carries that, as upstream's does.
        let foreign = inner_frame(OUR_MAC, PEER_MAC, PEER_IP, [10, 244, 1, 5]);
        let foreign_packet = vxlan_packet(PEER_IP, 1, &foreign);
        let (verdict, out) = dp.run(names::PROG_DECAP, &foreign_packet);
        assert_eq!(
            (verdict, out),
            (TC_ACT_OK, foreign_packet),
            "inner source outside the peer's subnet goes to the kernel device untouched"
        );
        assert_eq!(
            dp.counter(names::MAP_PASSES, PassReason::ForeignSource as u32),
            1
        );

        let mut fragment = vxlan_packet(PEER_IP, 1, &inner);
        fragment[20] |= 0x20; // MF
        let (verdict, out) = dp.run(names::PROG_DECAP, &fragment);
        assert_eq!(
            verdict, TC_ACT_OK,
            "outer fragments go to the kernel for reassembly"
        );
        assert_eq!(out, fragment);
        assert_eq!(
            dp.counter(names::MAP_PASSES, PassReason::Fragment as u32),
            1
        );

        let mut arp = inner.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let arp_packet = vxlan_packet(PEER_IP, 1, &arp);
        let (verdict, out) = dp.run(names::PROG_DECAP, &arp_packet);
        assert_eq!(
            verdict, TC_ACT_OK,
            "inner ARP is the kernel device's to answer"
        );
        assert_eq!(out, arp_packet, "and reaches it untouched");
        assert_eq!(dp.counter(names::MAP_PASSES, PassReason::NotIpv4 as u32), 1);

        let mut other_port = vxlan_packet(PEER_IP, 1, &inner);
        other_port[36..38].copy_from_slice(&4789u16.to_be_bytes());
        let (verdict, out) = dp.run(names::PROG_DECAP, &other_port);
        assert_eq!(
            (verdict, out),
            (TC_ACT_OK, other_port),
            "not our port: untouched"
        );
    });
}

#[test]
fn the_peer_check_comes_before_any_hand_off_to_the_kernel() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = PinDir::new("peercheck");
    let pin_path = pins.0.clone();
    in_fresh_netns(move || {
        let mut dp = Loaded::new(&pin_path);
        let inner = inner_frame(OUR_MAC, PEER_MAC, [10, 244, 2, 7], [10, 244, 1, 5]);
        let stranger = vxlan_packet([198, 18, 0, 99], 1, &inner);
        let peer = vxlan_packet(PEER_IP, 1, &inner);
        let drops = |dp: &Loaded| dp.counter(names::MAP_DROPS, DropReason::UnknownPeer as u32);

        // A stranger's first fragment (it holds the UDP header): dropped, so the kernel can
        // never reassemble the datagram.
        let (verdict, _) = dp.run(names::PROG_DECAP, &with_outer(&stranger, &[], MF));
        assert_eq!(verdict, TC_ACT_SHOT, "stranger's first fragment");
        assert_eq!(drops(&dp), 1);
        // With IP options (the UDP header moves): dropped as well.
        let (verdict, _) = dp.run(names::PROG_DECAP, &with_outer(&stranger, &NOP_OPTIONS, 0));
        assert_eq!(verdict, TC_ACT_SHOT, "stranger's VXLAN with IP options");
        assert_eq!(drops(&dp), 2);
        // Options and a first fragment at once.
        let (verdict, _) = dp.run(names::PROG_DECAP, &with_outer(&stranger, &NOP_OPTIONS, MF));
        assert_eq!(verdict, TC_ACT_SHOT);
        assert_eq!(drops(&dp), 3);
        // A non-first fragment has no UDP header: not identifiable as VXLAN, left alone.
        let later = with_outer(&stranger, &[], MF | 6);
        let (verdict, out) = dp.run(names::PROG_DECAP, &later);
        assert_eq!((verdict, out), (TC_ACT_OK, later));
        assert_eq!(drops(&dp), 3, "uncounted: maybe not VXLAN at all");

        // The known peer's fragments and options go to the kernel, which reassembles them.
        for (options, frag) in [(&[][..], MF), (&[][..], MF | 6), (&NOP_OPTIONS[..], 0)] {
            let p = with_outer(&peer, options, frag);
            let (verdict, out) = dp.run(names::PROG_DECAP, &p);
            assert_eq!(
                (verdict, out),
                (TC_ACT_OK, p),
                "options {options:?} frag {frag:#x}"
            );
        }
        assert_eq!(
            dp.counter(names::MAP_PASSES, PassReason::Fragment as u32),
            3
        );
        // Another port with options from a stranger is not ours.
        let mut other = with_outer(&stranger, &NOP_OPTIONS, 0);
        other[40..42].copy_from_slice(&4789u16.to_be_bytes());
        let (verdict, out) = dp.run(names::PROG_DECAP, &other);
        assert_eq!((verdict, out), (TC_ACT_OK, other));
        assert_eq!(drops(&dp), 3);

        // With the check off, a stranger's VXLAN goes to the kernel device, as upstream.
        dp.set_flags(dp.flags() | maps::CONFIG_F_ANY_PEER);
        let (verdict, out) = dp.run(names::PROG_DECAP, &stranger);
        assert_eq!((verdict, out), (TC_ACT_OK, stranger));
        assert_eq!(
            dp.counter(names::MAP_PASSES, PassReason::UnknownPeer as u32),
            1
        );
        assert_eq!(drops(&dp), 3);
    });
}

#[test]
fn outer_headers_the_kernel_would_drop_or_trim_go_to_it_untouched() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = PinDir::new("badouter");
    let pin_path = pins.0.clone();
    in_fresh_netns(move || {
        let mut dp = Loaded::new(&pin_path);
        let inner = inner_frame(OUR_MAC, PEER_MAC, [10, 244, 2, 7], [10, 244, 1, 5]);
        let good = vxlan_packet(PEER_IP, 1, &inner);
        // Found by ebpf_fuzz: each of these was decapsulated and delivered as it stood,
        // where the kernel's ip_rcv/udp_rcv drops (checksum, too long) or trims (too short).
        let mut bad_checksum = good.clone();
        bad_checksum[24] ^= 0xff;
        // Lengths changed with the header checksum kept valid, so only the length is wrong.
        let with_total = |delta: i16| {
            let mut p = good.clone();
            let total = u16::from_be_bytes([p[16], p[17]]).wrapping_add_signed(delta);
            p[16..18].copy_from_slice(&total.to_be_bytes());
            p[24..26].copy_from_slice(&[0, 0]);
            let c = wire::ipv4_header_checksum(&p[14..34].try_into().unwrap());
            p[24..26].copy_from_slice(&c.to_be_bytes());
            p
        };
        let (ip_too_long, ip_too_short) = (with_total(4), with_total(-4));
        let mut udp_too_long = good.clone();
        udp_too_long[39] += 4;
        for (i, p) in [bad_checksum, ip_too_long, ip_too_short, udp_too_long]
            .into_iter()
            .enumerate()
        {
            let (verdict, out) = dp.run(names::PROG_DECAP, &p);
            assert_eq!((verdict, out), (TC_ACT_OK, p), "case {i}");
            assert_eq!(
                dp.counter(names::MAP_PASSES, PassReason::BadOuter as u32),
                i as u64 + 1
            );
        }
        let (verdict, out) = dp.run(names::PROG_DECAP, &good);
        assert_eq!((verdict, out), (TC_ACT_REDIRECT, inner));
    });
}

#[test]
fn gbp_flags_are_accepted_only_when_the_network_uses_gbp() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = PinDir::new("gbp");
    let pin_path = pins.0.clone();
    in_fresh_netns(move || {
        let mut dp = Loaded::new(&pin_path);
        let inner = inner_frame(OUR_MAC, PEER_MAC, [10, 244, 2, 7], [10, 244, 1, 5]);
        let mut gbp = vxlan_packet(PEER_IP, 1, &inner);
        gbp[42..50].copy_from_slice(&wire::vxlan_gbp_header(1, 0x0042));
        let (verdict, _) = dp.run(names::PROG_DECAP, &gbp);
        assert_eq!(verdict, TC_ACT_SHOT, "G bit on a network without GBP");
        assert_eq!(dp.counter(names::MAP_DROPS, DropReason::BadFlags as u32), 1);

        dp.set_flags(dp.flags() | maps::CONFIG_F_GBP);
        let (verdict, out) = dp.run(names::PROG_DECAP, &gbp);
        assert_eq!(
            (verdict, out),
            (TC_ACT_REDIRECT, inner.clone()),
            "GBP network"
        );
        let (verdict, _) = dp.run(names::PROG_DECAP, &vxlan_packet(PEER_IP, 1, &inner));
        assert_eq!(verdict, TC_ACT_REDIRECT, "no G bit on a GBP network");
    });
}

#[test]
fn bpftool_dumps_the_pinned_maps_with_field_names() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = PinDir::new("bpftool");
    let pin_path = pins.0.clone();
    in_fresh_netns(move || {
        let _dp = Loaded::new(&pin_path);
        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(pin_path.join(names::MAP_ROUTES))
            .output()
            .expect("run bpftool");
        assert!(
            out.status.success(),
            "bpftool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dump: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
        let entry = &dump[0]["formatted"];
        assert_eq!(entry["value"]["peer_slot"], 3, "dump: {dump}");
        let ip: Vec<u8> = entry["value"]["peer_ip"]
            .as_array()
            .expect("peer_ip array")
            .iter()
            .map(|v| v.as_u64().unwrap() as u8)
            .collect();
        // 16 bytes for both families; IPv4 as IPv4-mapped.
        assert_eq!(ip.len(), 16, "dump: {dump}");
        assert_eq!(&ip[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(
            Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
            Ipv4Addr::from(PEER_IP)
        );
        assert!(entry["value"]["vtep_mac"].is_array());

        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(pin_path.join(names::MAP_CONFIG))
            .output()
            .expect("run bpftool");
        let dump: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
        assert_eq!(dump[0]["formatted"]["value"]["vni"], 1, "dump: {dump}");
        assert_eq!(dump[0]["formatted"]["value"]["port"], 8472);
    });
}

#[test]
fn fast_path_decap_hands_frames_for_local_pods_straight_to_their_veth() {
    if !flannel_e2e::require_root() {
        return;
    }
    let pins = PinDir::new("fast");
    let pin_path = pins.0.clone();
    in_fresh_netns(move || {
        let mut dp = Loaded::new(&pin_path);
        dp.set_flags(dp.flags() | maps::CONFIG_F_FAST_INGRESS);
        let pod_mac = [0x02, 0x0d, 0, 0, 0, 5];
        let veth_mac = [0x02, 0x0e, 0, 0, 0, 5];
        let mut endpoints: HashMap<
            &mut MapData,
            flannel_common::EndpointKey,
            flannel_common::Endpoint,
        > = HashMap::try_from(dp.ebpf.map_mut(names::MAP_ENDPOINTS).unwrap()).unwrap();
        endpoints
            .insert(
                flannel_common::EndpointKey {
                    addr: [10, 244, 1, 5],
                },
                flannel_common::Endpoint {
                    ifindex: 42,
                    pod_mac,
                    host_mac: veth_mac,
                },
                0,
            )
            .unwrap();

        let inner = inner_frame(OUR_MAC, PEER_MAC, [10, 244, 2, 7], [10, 244, 1, 5]);
        let (verdict, out) = dp.run(names::PROG_DECAP, &vxlan_packet(PEER_IP, 1, &inner));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(&out[0..6], &pod_mac, "delivered to the pod's MAC");
        assert_eq!(&out[6..12], &veth_mac, "from the host side of its veth");
        assert_eq!(
            &out[12..],
            &inner[12..],
            "the inner packet itself is untouched"
        );

        // A pod not in the map takes the default path (into flannel.1, inner MACs kept).
        let other = inner_frame(OUR_MAC, PEER_MAC, [10, 244, 2, 7], [10, 244, 1, 6]);
        let (verdict, out) = dp.run(names::PROG_DECAP, &vxlan_packet(PEER_IP, 1, &other));
        assert_eq!((verdict, out), (TC_ACT_REDIRECT, other));
    });
}
