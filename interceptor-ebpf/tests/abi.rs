//! The Rust mirror and the C structs can never drift: compare every mirrored struct with the BTF
//! clang wrote into the object.

use std::mem::{offset_of, size_of};

use btf_rs::{Btf, Type};
use interceptor_ebpf::abi::{
    CidrKey, InboundPort, IpPort, INBOUND_CAPTURE, INBOUND_EXCLUDE, INBOUND_SOURCE4,
    OUTBOUND_ALLOW_ANY, OUTBOUND_REGISTRY_ONLY, SSH_PORT,
};
use object::{Object, ObjectSection, ObjectSymbol};

fn btf() -> Btf {
    let elf =
        object::File::parse(interceptor_ebpf::capture_object()).expect("capture object is ELF");
    let section = elf.section_by_name(".BTF").expect("object has .BTF");
    Btf::from_bytes(section.data().expect(".BTF data")).expect("valid BTF")
}

/// (size, [(member name, byte offset)]) of a C struct.
fn c_layout(btf: &Btf, name: &str) -> (usize, Vec<(String, usize)>) {
    let types = btf.resolve_types_by_name(name).expect("struct in BTF");
    let st = types
        .iter()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{name} is not a struct in BTF"));
    let members = st
        .members
        .iter()
        .map(|m| {
            let name = btf.resolve_name(m).expect("member name");
            (name, m.bit_offset() as usize / 8)
        })
        .collect();
    (st.size(), members)
}

#[test]
fn ip_port_matches_c() {
    let (size, members) = c_layout(&btf(), "ip_port");
    assert_eq!(size, size_of::<IpPort>());
    assert_eq!(
        members,
        vec![
            ("addr".to_string(), offset_of!(IpPort, addr)),
            ("port".to_string(), offset_of!(IpPort, port)),
            ("family".to_string(), offset_of!(IpPort, family)),
        ]
    );
}

#[test]
fn cidr_key_matches_c() {
    let (size, members) = c_layout(&btf(), "cidr_key");
    assert_eq!(size, size_of::<CidrKey>());
    assert_eq!(
        members,
        vec![
            ("prefixlen".to_string(), offset_of!(CidrKey, prefixlen)),
            ("addr".to_string(), offset_of!(CidrKey, addr)),
        ]
    );
}

#[test]
fn inbound_port_matches_c() {
    let (size, members) = c_layout(&btf(), "inbound_port");
    assert_eq!(size, size_of::<InboundPort>());
    assert_eq!(
        members,
        vec![("action".to_string(), offset_of!(InboundPort, action))]
    );
}

/// The enumerators of a C enum, by name.
fn c_enum(btf: &Btf, name: &str) -> Vec<(String, u32)> {
    let types = btf.resolve_types_by_name(name).expect("enum in BTF");
    let e = types
        .iter()
        .find_map(|t| match t {
            Type::Enum(e) => Some(e.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{name} is not an enum in BTF"));
    e.members
        .iter()
        .map(|m| (btf.resolve_name(m).expect("enumerator name"), m.val()))
        .collect()
}

#[test]
fn constants_match_c() {
    let btf = btf();
    assert_eq!(
        c_enum(&btf, "inbound_action"),
        vec![
            ("INBOUND_CAPTURE".to_string(), INBOUND_CAPTURE),
            ("INBOUND_EXCLUDE".to_string(), INBOUND_EXCLUDE),
        ]
    );
    assert_eq!(
        c_enum(&btf, "outbound_traffic_mode"),
        vec![
            ("OUTBOUND_ALLOW_ANY".to_string(), OUTBOUND_ALLOW_ANY),
            ("OUTBOUND_REGISTRY_ONLY".to_string(), OUTBOUND_REGISTRY_ONLY),
        ]
    );
    assert_eq!(
        c_enum(&btf, "abi_constant"),
        vec![
            ("SSH_PORT".to_string(), u32::from(SSH_PORT)),
            ("INBOUND_SOURCE4".to_string(), u32::from(INBOUND_SOURCE4)),
        ]
    );
}

#[test]
fn object_has_every_program() {
    let elf = object::File::parse(interceptor_ebpf::capture_object()).expect("ELF");
    let names: Vec<String> = elf
        .symbols()
        .filter_map(|s| s.name().ok().map(str::to_string))
        .collect();
    let all = interceptor_ebpf::programs::SOCK_ADDR.iter().chain([
        &interceptor_ebpf::programs::SOCKOPS,
        &interceptor_ebpf::programs::SK_LOOKUP,
    ]);
    for p in all {
        assert!(
            names.iter().any(|n| n == p),
            "program {p} missing from object"
        );
    }
}
