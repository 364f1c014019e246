//! Reading the running kernel's BTF: where a structure's members are and what a raw
//! tracepoint's arguments are (the programs that read kernel structures get their offsets
//! and argument positions from here, never compiled in).

use std::ffi::OsStr;

use libbpf_rs::btf::types::{FuncProto, Ptr, Struct, Union};
use libbpf_rs::btf::{Btf, BtfKind, BtfType, ReferencesType};

use crate::BpfError;

pub(crate) fn btf_err(what: impl Into<String>) -> BpfError {
    BpfError::Btf(what.into())
}

/// One argument of a raw tracepoint, as the running kernel declares it.
pub(crate) struct TpArg {
    /// Its kind (modifiers and typedefs skipped).
    pub kind: BtfKind,
    /// Its type's name, if it has one (an enum's, a struct's).
    pub name: Option<String>,
    /// For a pointer, the name of what it points to.
    pub pointee: Option<String>,
}

/// The arguments of raw tracepoint `tp`, in the order a program reads them
/// (`ctx->args[i]`): its prototype `btf_trace_TP` less the context pointer it starts with.
pub(crate) fn tracepoint_args(btf: &Btf, tp: &str) -> Result<Vec<TpArg>, BpfError> {
    let td: BtfType = btf
        .type_by_name(&format!("btf_trace_{tp}"))
        .ok_or_else(|| btf_err(format!("no tracepoint {tp} in the kernel's BTF")))?;
    let proto = Ptr::try_from(td.skip_mods_and_typedefs())
        .map(|p| p.referenced_type())
        .ok()
        .and_then(|t| FuncProto::try_from(t).ok())
        .ok_or_else(|| btf_err(format!("btf_trace_{tp} is not a function pointer")))?;
    let name = |t: BtfType| t.name().map(|n| n.to_string_lossy().into_owned());
    Ok(proto
        .iter()
        .skip(1)
        .filter_map(|p| btf.type_by_id::<BtfType>(p.ty))
        .map(|t| {
            let t = t.skip_mods_and_typedefs();
            TpArg {
                kind: t.kind(),
                name: name(t),
                pointee: Ptr::try_from(t)
                    .ok()
                    .and_then(|p| name(p.referenced_type().skip_mods_and_typedefs())),
            }
        })
        .collect())
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
