//! Reading the running kernel's BTF: where a structure's members are (the programs that
//! read kernel structures get their offsets from here, never compiled in).

use std::ffi::OsStr;

use libbpf_rs::btf::types::{Struct, Union};
use libbpf_rs::btf::{Btf, BtfKind, BtfType};

use crate::BpfError;

pub(crate) fn btf_err(what: impl Into<String>) -> BpfError {
    BpfError::Btf(what.into())
}

/// The offset in bytes of member `path` (nested names, through anonymous structs and unions
/// on the way) of the struct named `name`.
pub(crate) fn offset_of(btf: &Btf, name: &str, path: &[&str]) -> Result<u32, BpfError> {
    let st: Struct = btf
        .type_by_name(name)
        .ok_or_else(|| btf_err(format!("no struct {name} in the kernel's BTF")))?;
    let mut ty: BtfType = *st;
    let mut off = 0;
    for field in path {
        let (bits, next) = find_member(btf, ty, field).ok_or_else(|| {
            btf_err(format!(
                "no member {} in struct {name} of the kernel's BTF",
                path.join(".")
            ))
        })?;
        off += bits;
        ty = next.skip_mods_and_typedefs();
    }
    if off % 8 != 0 {
        return Err(btf_err(format!("{name}.{} is a bit field", path.join("."))));
    }
    Ok(off / 8)
}

/// Member `field` of struct or union `ty`: its offset in bits and its type, looking into
/// anonymous members too.
fn find_member<'b>(btf: &'b Btf, ty: BtfType<'b>, field: &str) -> Option<(u32, BtfType<'b>)> {
    let members: Vec<(Option<String>, u32, libbpf_rs::btf::TypeId)> = match ty.kind() {
        BtfKind::Struct => {
            let st = Struct::try_from(ty).ok()?;
            st.iter()
                .map(|m| (name_of(m.name), bit_offset(m.attr), m.ty))
                .collect()
        }
        BtfKind::Union => {
            let un = Union::try_from(ty).ok()?;
            un.iter()
                .map(|m| (name_of(m.name), bit_offset(m.attr), m.ty))
                .collect()
        }
        _ => return None,
    };
    for (name, off, id) in &members {
        let mty: BtfType = btf.type_by_id(*id)?;
        match name {
            Some(n) if n == field => return Some((*off, mty)),
            None => {
                if let Some((inner, t)) = find_member(btf, mty.skip_mods_and_typedefs(), field) {
                    return Some((off + inner, t));
                }
            }
            _ => {}
        }
    }
    None
}

fn name_of(n: Option<&OsStr>) -> Option<String> {
    n.map(|n| n.to_string_lossy().into_owned())
}

fn bit_offset(a: libbpf_rs::btf::types::MemberAttr) -> u32 {
    match a {
        libbpf_rs::btf::types::MemberAttr::Normal { offset } => offset,
        libbpf_rs::btf::types::MemberAttr::BitField { offset, .. } => offset,
    }
}
