//! What the programs need to know about the running kernel, read from its BTF: struct field
//! offsets, function and tracepoint signatures, and enum values by name. Pure parsing: it takes
//! BTF bytes and never touches the system, so it is tested with hand-built BTF blobs.

use std::collections::BTreeMap;

use anyhow::{Context, Result, anyhow, bail};
use btf_rs::{Btf, BtfType, Type};
use serde::Serialize;
use tcp_trace_common::{AuxHook, Config, Hook};

use super::enums::{KReason, KTwStatus};
use crate::model::{RstReason, TwStatus};

/// The running kernel's BTF, with the look-ups tcp-trace needs.
pub(crate) struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    pub(crate) fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let btf = Btf::from_bytes(bytes).map_err(|e| anyhow!("malformed BTF: {e}"))?;
        Ok(Self { btf })
    }

    fn named(&self, name: &str) -> Vec<Type> {
        self.btf.resolve_types_by_name(name).unwrap_or_default()
    }

    fn strukt(&self, name: &str) -> Result<btf_rs::Struct> {
        self.named(name)
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
            .ok_or_else(|| anyhow!("struct {name} is not in the kernel's BTF"))
    }

    fn name_of(&self, t: &dyn BtfType) -> String {
        self.btf.resolve_name(t).unwrap_or_default()
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn underlying(&self, mut t: Type) -> Result<Type> {
        for _ in 0..32 {
            t = match t {
                Type::Typedef(ref x) => self.btf.resolve_chained_type(x)?,
                Type::Volatile(ref x) | Type::Const(ref x) | Type::Restrict(ref x) => {
                    self.btf.resolve_chained_type(x)?
                }
                Type::TypeTag(ref x) => self.btf.resolve_chained_type(x)?,
                other => return Ok(other),
            };
        }
        bail!("type chain too long")
    }

    /// Byte offset of `field` in `members` (a struct or union body), descending into anonymous
    /// structs and unions the way C does. Bitfields are refused: the programs read whole bytes.
    fn find_member(&self, members: &[btf_rs::Member], field: &str) -> Result<Option<(u32, Type)>> {
        for m in members {
            let name = self.name_of(m);
            if name == field {
                if m.bitfield_size().is_some_and(|b| b != 0) {
                    bail!("field {field} is a bitfield");
                }
                if m.bit_offset() % 8 != 0 {
                    bail!("field {field} is not byte aligned");
                }
                let ty = self.btf.resolve_chained_type(m)?;
                return Ok(Some((m.bit_offset() / 8, ty)));
            }
            if name.is_empty() {
                let inner = self.underlying(self.btf.resolve_chained_type(m)?)?;
                let body = match inner {
                    Type::Struct(s) | Type::Union(s) => s.members,
                    _ => continue,
                };
                if let Some((off, ty)) = self.find_member(&body, field)? {
                    return Ok(Some((m.bit_offset() / 8 + off, ty)));
                }
            }
        }
        Ok(None)
    }

    /// Byte offset of a dotted field path (`"ns.inum"`) from the start of `struct name`.
    pub(crate) fn offset_of(&self, name: &str, path: &str) -> Result<u32> {
        let mut members = self.strukt(name)?.members;
        let mut total = 0;
        let mut parts = path.split('.').peekable();
        while let Some(field) = parts.next() {
            let (off, ty) = self
                .find_member(&members, field)?
                .ok_or_else(|| anyhow!("struct {name} has no field {path}"))?;
            total += off;
            if parts.peek().is_some() {
                members = match self.underlying(ty)? {
                    Type::Struct(s) | Type::Union(s) => s.members,
                    _ => bail!("{name}.{path}: {field} is not a struct"),
                };
            }
        }
        Ok(total)
    }

    /// Enumerators of `enum name` (32- or 64-bit), by value.
    pub(crate) fn enum_values(&self, name: &str) -> Result<BTreeMap<u64, String>> {
        for t in self.named(name) {
            match t {
                Type::Enum(e) if !e.members.is_empty() => {
                    return Ok(e
                        .members
                        .iter()
                        .map(|m| (m.val() as u64, self.name_of(m)))
                        .collect());
                }
                Type::Enum64(e) if !e.members.is_empty() => {
                    return Ok(e
                        .members
                        .iter()
                        .map(|m| (m.val(), self.name_of(m)))
                        .collect());
                }
                _ => {}
            }
        }
        bail!("enum {name} is not in the kernel's BTF")
    }

    fn proto_params(&self, proto: &btf_rs::FuncProto) -> Vec<String> {
        proto.parameters.iter().map(|p| self.name_of(p)).collect()
    }

    /// Parameter names of kernel function `name`, or None when BTF has no such function (it
    /// does not exist, or was inlined everywhere and has no symbol).
    pub(crate) fn function_params(&self, name: &str) -> Result<Option<Vec<String>>> {
        for t in self.named(name) {
            if let Type::Func(f) = t
                && let Type::FuncProto(p) = self.btf.resolve_chained_type(&f)?
            {
                return Ok(Some(self.proto_params(&p)));
            }
        }
        Ok(None)
    }

    /// Arguments of tracepoint `name` (its TP_PROTO, without the leading context pointer), from
    /// the `btf_trace_<name>` typedef the kernel defines for every tracepoint.
    pub(crate) fn tracepoint_params(&self, name: &str) -> Result<Option<Vec<String>>> {
        for t in self.named(&format!("btf_trace_{name}")) {
            if let Type::Typedef(td) = t {
                let ptr = self.btf.resolve_chained_type(&td)?;
                let Type::Ptr(ptr) = ptr else { continue };
                if let Type::FuncProto(p) = self.btf.resolve_chained_type(&ptr)? {
                    let mut params = self.proto_params(&p);
                    if !params.is_empty() {
                        params.remove(0);
                    }
                    return Ok(Some(params));
                }
            }
        }
        Ok(None)
    }
}

/// The kernel functions tcp-trace hooks (from the registry; each once).
pub(crate) fn hooked_functions() -> impl Iterator<Item = &'static str> {
    targets(true).chain(AuxHook::ALL.into_iter().filter_map(AuxHook::function))
}

/// The tracepoints tcp-trace hooks, without their system.
pub(crate) fn hooked_tracepoints() -> impl Iterator<Item = &'static str> {
    targets(false)
}

fn targets(functions: bool) -> impl Iterator<Item = &'static str> {
    let hooks = Hook::ALL
        .into_iter()
        .filter(move |h| h.is_function() == functions);
    // tcp_timewait_state_process is hooked twice (entry and return) but is one function.
    hooks
        .enumerate()
        .filter(move |(i, h)| {
            !Hook::ALL
                .into_iter()
                .filter(|o| o.is_function() == functions)
                .take(*i)
                .any(|o| o.target() == h.target())
        })
        .map(|(_, h)| h.target())
}

/// Everything tcp-trace learned from BTF. Serialized into recorded traces so that replay can
/// decode them without the kernel.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
#[serde(from = "FactsOnDisk")]
pub struct KernelFacts {
    /// Field offsets and signature flags handed to the eBPF programs.
    #[serde(skip)]
    pub(crate) config: Config,
    /// `enum sk_rst_reason` (6.10+), value -> name without the `SK_RST_REASON_` prefix.
    rst_reasons: BTreeMap<u64, String>,
    /// `enum tcp_tw_status`, value -> name without the `TCP_TW_` prefix.
    tw_status: BTreeMap<u64, String>,
    /// Parameter names of each hooked function; absent when BTF does not list it.
    pub(crate) functions: BTreeMap<String, Vec<String>>,
    /// Arguments of each tracepoint.
    pub(crate) tracepoints: BTreeMap<String, Vec<String>>,
    /// The two enums above as typed values, indexed by the kernel's number: built once from
    /// the names, so that decoding an event is an index, not a name look-up.
    #[serde(skip)]
    values: ValueTables,
}

/// The serialized fields of [`KernelFacts`] (the recording header's `facts`).
#[derive(serde::Deserialize)]
struct FactsOnDisk {
    rst_reasons: BTreeMap<u64, String>,
    tw_status: BTreeMap<u64, String>,
    functions: BTreeMap<String, Vec<String>>,
    tracepoints: BTreeMap<String, Vec<String>>,
}

impl From<FactsOnDisk> for KernelFacts {
    fn from(d: FactsOnDisk) -> KernelFacts {
        KernelFacts::new(
            Config::default(),
            d.rst_reasons,
            d.tw_status,
            d.functions,
            d.tracepoints,
        )
    }
}

/// Kernel enum numbers -> the model's enums. Numbers no name maps are absent (`None`), and so
/// are numbers beyond the table: enums this small never get there, and a crafted recording
/// cannot make the table big.
#[derive(Clone, Debug, Default, PartialEq)]
struct ValueTables {
    rst: Vec<Option<RstReason>>,
    tw: Vec<Option<TwStatus>>,
}

const MAX_ENUM_VALUE: u64 = 1024;

fn table<T: Copy>(
    names: &BTreeMap<u64, String>,
    map: impl Fn(&str) -> Option<T>,
) -> Vec<Option<T>> {
    let mut t = Vec::new();
    for (&value, name) in names.range(..MAX_ENUM_VALUE) {
        let i = value as usize;
        if t.len() <= i {
            t.resize(i + 1, None);
        }
        t[i] = map(name);
    }
    t
}

/// The offsets that take a descriptor to its socket (see `Config::fd_to_sock`), how files count
/// references, and a segment's device's namespace (`Config::skb_netns_known`). Optional: without
/// them owners are learned from socket events only (`doctor` says so), and a reply built from a
/// segment alone gets its namespace from the 4-tuple's other events.
fn fd_offsets(btf: &KernelBtf) -> Config {
    let path = [
        ("task_struct", "files"),
        ("files_struct", "fdt"),
        ("fdtable", "fd"),
        ("fdtable", "max_fds"),
        ("file", "private_data"),
        ("file", "f_inode"),
        ("inode", "i_mode"),
        ("socket", "sk"),
    ]
    .map(|(s, f)| btf.offset_of(s, f).ok());
    let mut config = Config::default();
    if let [
        Some(task_files),
        Some(files_fdt),
        Some(fdt_fd),
        Some(fdt_max_fds),
        Some(file_private_data),
        Some(file_inode),
        Some(inode_mode),
        Some(socket_sk),
    ] = path
    {
        config = Config {
            fd_to_sock: 1,
            task_files,
            files_fdt,
            fdt_fd,
            fdt_max_fds,
            file_private_data,
            file_inode,
            inode_mode,
            socket_sk,
            ..config
        };
    }
    // atomic_long_t f_count holds the count; 6.13's file_ref_t f_ref holds count - 1.
    if let Ok(off) = btf.offset_of("file", "f_count") {
        (
            config.file_refs,
            config.file_refs_one,
            config.file_refs_known,
        ) = (off, 1, 1);
    } else if let Ok(off) = btf.offset_of("file", "f_ref") {
        (
            config.file_refs,
            config.file_refs_one,
            config.file_refs_known,
        ) = (off, 0, 1);
    }
    if let (Ok(dev), Ok(nd_net)) = (
        btf.offset_of("sk_buff", "dev"),
        btf.offset_of("net_device", "nd_net"),
    ) {
        (config.skb_dev, config.dev_nd_net, config.skb_netns_known) = (dev, nd_net, 1);
    }
    config
}

fn strip_all(map: BTreeMap<u64, String>, prefix: &str) -> BTreeMap<u64, String> {
    map.into_iter()
        .map(|(k, v)| (k, v.strip_prefix(prefix).map(str::to_string).unwrap_or(v)))
        .collect()
}

impl KernelFacts {
    pub(crate) fn from_btf(btf: &KernelBtf) -> Result<Self> {
        let off = |s: &str, f: &str| {
            btf.offset_of(s, f)
                .with_context(|| format!("reading the offset of {s}.{f} from BTF"))
        };
        let sock_flags = btf.enum_values("sock_flags")?;
        let flag_bit = |name: &str| -> Result<u32> {
            sock_flags
                .iter()
                .find(|(_, n)| n.as_str() == name)
                .map(|(v, _)| *v as u32)
                .ok_or_else(|| anyhow!("enum sock_flags has no {name}"))
        };
        let mut functions = BTreeMap::new();
        for f in hooked_functions() {
            if let Some(p) = btf.function_params(f)? {
                functions.insert(f.to_string(), p);
            }
        }
        let mut tracepoints = BTreeMap::new();
        for tp in hooked_tracepoints() {
            if let Some(p) = btf.tracepoint_params(tp)? {
                tracepoints.insert(tp.to_string(), p);
            }
        }
        let has_param = |params: Option<&Vec<String>>, idx: usize| -> u32 {
            params.is_some_and(|p| p.len() > idx) as u32
        };
        let config = Config {
            skc_daddr: off("sock_common", "skc_daddr")?,
            skc_rcv_saddr: off("sock_common", "skc_rcv_saddr")?,
            skc_dport: off("sock_common", "skc_dport")?,
            skc_num: off("sock_common", "skc_num")?,
            skc_family: off("sock_common", "skc_family")?,
            skc_state: off("sock_common", "skc_state")?,
            skc_v6_daddr: off("sock_common", "skc_v6_daddr")?,
            skc_v6_rcv_saddr: off("sock_common", "skc_v6_rcv_saddr")?,
            skc_net: off("sock_common", "skc_net")?,
            net_ns_inum: off("net", "ns.inum")?,
            sk_flags: off("sock_common", "skc_flags")?,
            sk_lingertime: off("sock", "sk_lingertime")?,
            sk_protocol: off("sock", "sk_protocol")?,
            tp_rcv_nxt: off("tcp_sock", "rcv_nxt")?,
            tp_copied_seq: off("tcp_sock", "copied_seq")?,
            tp_write_seq: off("tcp_sock", "write_seq")?,
            tp_snd_nxt: off("tcp_sock", "snd_nxt")?,
            tp_snd_una: off("tcp_sock", "snd_una")?,
            tw_substate: off("inet_timewait_sock", "tw_substate")?,
            // #define tw_rcv_nxt tw_sk.__tw_common.skc_tw_rcv_nxt
            tw_rcv_nxt: off("sock_common", "skc_tw_rcv_nxt")?,
            skb_len: off("sk_buff", "len")?,
            skb_head: off("sk_buff", "head")?,
            skb_network_header: off("sk_buff", "network_header")?,
            skb_transport_header: off("sk_buff", "transport_header")?,
            sock_flag_dead: flag_bit("SOCK_DEAD")?,
            sock_flag_done: flag_bit("SOCK_DONE")?,
            sock_flag_linger: flag_bit("SOCK_LINGER")?,
            // (sk, gfp_t) before 6.10, (sk, gfp_t, enum sk_rst_reason) after; found by name
            // because a compiler may drop the unused gfp_t (BTF then lists (sk, reason)).
            active_reset_reason_arg: functions
                .get("tcp_send_active_reset")
                .and_then(|p| p.iter().position(|n| n == "reason"))
                .map_or(0, |i| i as u32 + 1),
            // TP_PROTO(sk, skb) before 6.10, (sk, skb, reason) after.
            send_reset_has_reason: has_param(tracepoints.get("tcp_send_reset"), 2),
            filter_pids: 0,
            filter_ports: 0,
            inet_sport: off("inet_sock", "inet_sport")?,
            capture_stacks: 0,
            pt_regs_sp: btf.offset_of("pt_regs", "sp").unwrap_or(0),
            pt_regs_di: btf.offset_of("pt_regs", "di").unwrap_or(0),
            filter_cgroups: 0,
            filter_netns: 0,
            ..fd_offsets(btf)
        };
        Ok(Self::new(
            config,
            btf.enum_values("sk_rst_reason")
                .map(|m| strip_all(m, "SK_RST_REASON_"))
                .unwrap_or_default(),
            strip_all(btf.enum_values("tcp_tw_status")?, "TCP_TW_"),
            functions,
            tracepoints,
        ))
    }

    /// Facts from their parts: enum names are value -> name without the kernel's prefix.
    pub fn new(
        config: Config,
        rst_reasons: BTreeMap<u64, String>,
        tw_status: BTreeMap<u64, String>,
        functions: BTreeMap<String, Vec<String>>,
        tracepoints: BTreeMap<String, Vec<String>>,
    ) -> KernelFacts {
        let values = ValueTables {
            rst: table(&rst_reasons, RstReason::from_kernel_name),
            tw: table(&tw_status, TwStatus::from_kernel_name),
        };
        KernelFacts {
            config,
            rst_reasons,
            tw_status,
            functions,
            tracepoints,
            values,
        }
    }

    /// What these facts show of the kernel's teardown, for the model's parameters.
    pub(crate) fn detected(&self) -> crate::model::DetectedKernel {
        let has =
            |params: Option<&Vec<String>>, name: &str| params.map(|p| p.iter().any(|n| n == name));
        crate::model::DetectedKernel {
            // A tracepoint's prototype (btf_trace_<name>) has unnamed parameters: count them.
            passive_reset_reasons: self.tracepoints.get("tcp_send_reset").map(|p| p.len() > 2),
            active_reset_argument: has(self.functions.get("tcp_send_active_reset"), "reason"),
            tw_ack_oow: (!self.tw_status.is_empty())
                .then(|| self.tw_status.values().any(|n| n == "ACK_OOW")),
            tw_isn_argument: has(self.functions.get("tcp_timewait_state_process"), "tw_isn"),
        }
    }

    /// `enum sk_rst_reason` as the kernel names it (empty before 6.10).
    pub(crate) fn rst_reason_names(&self) -> &BTreeMap<u64, String> {
        &self.rst_reasons
    }

    /// `enum tcp_tw_status` as the kernel names it.
    pub(crate) fn tw_status_names(&self) -> &BTreeMap<u64, String> {
        &self.tw_status
    }

    /// An `enum sk_rst_reason` number of this kernel as a typed value.
    pub(crate) fn rst_reason(&self, value: u32) -> KReason {
        match self.values.rst.get(value as usize) {
            Some(Some(r)) => KReason::Known(*r),
            _ => KReason::Unknown(value),
        }
    }

    /// An `enum tcp_tw_status` number of this kernel as a typed value.
    pub(crate) fn tw_status(&self, value: i32) -> KTwStatus {
        match usize::try_from(value)
            .ok()
            .and_then(|i| self.values.tw.get(i))
        {
            Some(Some(s)) => KTwStatus::Known(*s),
            _ => KTwStatus::Unknown(value),
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A tiny BTF writer, to test the look-ups on known layouts without a kernel.

    #[derive(Default)]
    pub(crate) struct BtfBuilder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    const INT: u32 = 1;
    const PTR: u32 = 2;
    const STRUCT: u32 = 4;
    const UNION: u32 = 5;
    const ENUM: u32 = 6;
    const TYPEDEF: u32 = 8;
    const FUNC: u32 = 12;
    const FUNC_PROTO: u32 = 13;

    impl BtfBuilder {
        pub(crate) fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }

        fn str(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        fn header(&mut self, name: &str, kind: u32, vlen: u32, size_or_type: u32) -> u32 {
            let name_off = self.str(name);
            for w in [name_off, (kind << 24) | vlen, size_or_type] {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
            let id = self.next_id;
            self.next_id += 1;
            id
        }

        fn word(&mut self, w: u32) {
            self.types.extend_from_slice(&w.to_le_bytes());
        }

        pub(crate) fn int(&mut self, name: &str, size: u32) -> u32 {
            let id = self.header(name, INT, 0, size);
            self.word(size * 8);
            id
        }

        pub(crate) fn ptr(&mut self, to: u32) -> u32 {
            self.header("", PTR, 0, to)
        }

        /// `members`: (name, type id, byte offset).
        pub(crate) fn strukt(
            &mut self,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            self.aggregate(STRUCT, name, size, members)
        }

        pub(crate) fn union(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
            self.aggregate(UNION, name, size, members)
        }

        fn aggregate(&mut self, kind: u32, name: &str, size: u32, m: &[(&str, u32, u32)]) -> u32 {
            let id = self.header(name, kind, m.len() as u32, size);
            for (n, ty, off) in m {
                let n = self.str(n);
                self.word(n);
                self.word(*ty);
                self.word(off * 8);
            }
            id
        }

        pub(crate) fn enumeration(&mut self, name: &str, values: &[(&str, u32)]) -> u32 {
            let id = self.header(name, ENUM, values.len() as u32, 4);
            for (n, v) in values {
                let n = self.str(n);
                self.word(n);
                self.word(*v);
            }
            id
        }

        pub(crate) fn typedef(&mut self, name: &str, to: u32) -> u32 {
            self.header(name, TYPEDEF, 0, to)
        }

        pub(crate) fn func_proto(&mut self, ret: u32, params: &[(&str, u32)]) -> u32 {
            let id = self.header("", FUNC_PROTO, params.len() as u32, ret);
            for (n, ty) in params {
                let n = self.str(n);
                self.word(n);
                self.word(*ty);
            }
            id
        }

        pub(crate) fn func(&mut self, name: &str, proto: u32) -> u32 {
            self.header(name, FUNC, 1, proto)
        }

        pub(crate) fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&0xeb9fu16.to_le_bytes());
            out.push(1); // version
            out.push(0); // flags
            out.extend_from_slice(&24u32.to_le_bytes()); // hdr_len
            out.extend_from_slice(&0u32.to_le_bytes()); // type_off
            out.extend_from_slice(&(self.types.len() as u32).to_le_bytes());
            out.extend_from_slice(&(self.types.len() as u32).to_le_bytes()); // str_off
            out.extend_from_slice(&(self.strings.len() as u32).to_le_bytes());
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A kernel-shaped BTF: the structs and enums tcp-trace reads, with anonymous unions where
    /// the kernel has them. `with_reason` adds the 6.10+ reset-reason parameters.
    pub(crate) fn fake_kernel(with_reason: bool) -> Vec<u8> {
        let mut b = BtfBuilder::new();
        let u8_ = b.int("unsigned char", 1);
        let u16_ = b.int("short unsigned int", 2);
        let u32_ = b.int("unsigned int", 4);
        let u64_ = b.int("long unsigned int", 8);
        let addr6 = b.strukt("in6_addr", 16, &[("s6_addr32", u32_, 0)]);
        let pair = b.strukt("", 8, &[("skc_daddr", u32_, 0), ("skc_rcv_saddr", u32_, 4)]);
        let addrpair = b.union("", 8, &[("skc_addrpair", u64_, 0), ("", pair, 0)]);
        let ports = b.strukt("", 4, &[("skc_dport", u16_, 0), ("skc_num", u16_, 2)]);
        let portpair = b.union("", 4, &[("skc_portpair", u32_, 0), ("", ports, 0)]);
        let net_fwd = b.strukt("ns_common", 16, &[("stashed", u64_, 0), ("inum", u32_, 12)]);
        let net = b.strukt("net", 64, &[("passive", u32_, 0), ("ns", net_fwd, 40)]);
        let netp = b.ptr(net);
        let possible = b.strukt("", 8, &[("net", netp, 0)]);
        let possible_t = b.typedef("possible_net_t", possible);
        let sc = b.strukt(
            "sock_common",
            136,
            &[
                ("", addrpair, 0),
                ("skc_hash", u32_, 8),
                ("", portpair, 12),
                ("skc_family", u16_, 16),
                ("skc_state", u8_, 18),
                ("skc_net", possible_t, 48),
                ("skc_v6_daddr", addr6, 56),
                ("skc_v6_rcv_saddr", addr6, 72),
                ("skc_flags", u64_, 96),
                ("skc_tw_rcv_nxt", u32_, 104),
            ],
        );
        let sock = b.strukt(
            "sock",
            760,
            &[
                ("__sk_common", sc, 0),
                ("sk_lingertime", u64_, 300),
                ("sk_protocol", u16_, 514),
            ],
        );
        b.strukt(
            "tcp_sock",
            2200,
            &[
                ("inet_conn", sock, 0),
                ("rcv_nxt", u32_, 1540),
                ("copied_seq", u32_, 1544),
                ("write_seq", u32_, 1700),
                ("snd_nxt", u32_, 1580),
                ("snd_una", u32_, 1704),
            ],
        );
        b.strukt(
            "inet_sock",
            1000,
            &[("sk", sock, 0), ("inet_sport", u16_, 780)],
        );
        let tw = b.strukt(
            "inet_timewait_sock",
            168,
            &[("__tw_common", sc, 0), ("tw_substate", u8_, 148)],
        );
        b.strukt(
            "tcp_timewait_sock",
            200,
            &[("tw_sk", tw, 0), ("tw_rcv_wnd", u32_, 168)],
        );
        let hdrs = b.strukt(
            "",
            8,
            &[("transport_header", u16_, 0), ("network_header", u16_, 2)],
        );
        let hdr_union = b.union("", 8, &[("", hdrs, 0), ("headers", hdrs, 0)]);
        let net_device = b.strukt("net_device", 2000, &[("nd_net", possible_t, 280)]);
        let devp = b.ptr(net_device);
        let dev_union = b.union("", 8, &[("dev", devp, 0), ("dev_scratch", u64_, 0)]);
        b.strukt(
            "sk_buff",
            232,
            &[
                ("", dev_union, 16),
                ("len", u32_, 112),
                ("", hdr_union, 180),
                ("head", u64_, 200),
            ],
        );
        b.enumeration(
            "sock_flags",
            &[("SOCK_DEAD", 0), ("SOCK_DONE", 1), ("SOCK_LINGER", 6)],
        );
        b.enumeration(
            "tcp_tw_status",
            &[
                ("TCP_TW_SUCCESS", 0),
                ("TCP_TW_RST", 1),
                ("TCP_TW_ACK", 2),
                ("TCP_TW_SYN", 3),
            ],
        );
        let sockp = b.ptr(sock);
        let voidp = b.ptr(0);
        // Descriptor -> socket. 6.13 replaced file.f_count (count) by file.f_ref (count - 1).
        let i16_ = b.int("short unsigned int", 2);
        b.strukt("inode", 600, &[("i_mode", i16_, 0)]);
        let refs = if with_reason { "f_ref" } else { "f_count" };
        b.strukt(
            "file",
            232,
            &[
                (refs, u64_, 56),
                ("f_inode", voidp, 32),
                ("private_data", voidp, 200),
            ],
        );
        b.strukt("socket", 128, &[("sk", sockp, 24)]);
        b.strukt("fdtable", 56, &[("max_fds", u32_, 0), ("fd", voidp, 8)]);
        b.strukt("files_struct", 704, &[("fdt", voidp, 32)]);
        b.strukt("task_struct", 9000, &[("files", voidp, 2000)]);
        let close = b.func_proto(0, &[("sk", sockp), ("timeout", u64_)]);
        b.func("tcp_close", close);
        if with_reason {
            let reason = b.enumeration(
                "sk_rst_reason",
                &[
                    ("SK_RST_REASON_NOT_SPECIFIED", 0),
                    ("SK_RST_REASON_TCP_ABORT_ON_CLOSE", 9),
                ],
            );
            let ar = b.func_proto(0, &[("sk", sockp), ("priority", u32_), ("reason", reason)]);
            b.func("tcp_send_active_reset", ar);
            let tp = b.func_proto(
                0,
                &[
                    ("__data", voidp),
                    ("sk", sockp),
                    ("skb", voidp),
                    ("reason", reason),
                ],
            );
            let tpp = b.ptr(tp);
            b.typedef("btf_trace_tcp_send_reset", tpp);
        } else {
            let ar = b.func_proto(0, &[("sk", sockp), ("priority", u32_)]);
            b.func("tcp_send_active_reset", ar);
            let tp = b.func_proto(0, &[("__data", voidp), ("sk", sockp), ("skb", voidp)]);
            let tpp = b.ptr(tp);
            b.typedef("btf_trace_tcp_send_reset", tpp);
        }
        b.build()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::fake_kernel;
    use super::*;

    #[test]
    fn offsets_descend_into_anonymous_unions_and_nested_paths() {
        let btf = KernelBtf::from_bytes(&fake_kernel(true)).unwrap();
        assert_eq!(btf.offset_of("sock_common", "skc_daddr").unwrap(), 0);
        assert_eq!(btf.offset_of("sock_common", "skc_rcv_saddr").unwrap(), 4);
        assert_eq!(btf.offset_of("sock_common", "skc_dport").unwrap(), 12);
        assert_eq!(btf.offset_of("sock_common", "skc_num").unwrap(), 14);
        assert_eq!(btf.offset_of("net", "ns.inum").unwrap(), 52);
        assert_eq!(btf.offset_of("sk_buff", "network_header").unwrap(), 182);
        let err = btf.offset_of("sock", "sk_nonexistent").unwrap_err();
        assert!(err.to_string().contains("no field sk_nonexistent"), "{err}");
        assert!(btf.offset_of("no_such_struct", "x").is_err());
    }

    #[test]
    fn facts_follow_the_kernel_generation() {
        let new =
            KernelFacts::from_btf(&KernelBtf::from_bytes(&fake_kernel(true)).unwrap()).unwrap();
        assert_eq!(new.config.active_reset_reason_arg, 3);
        assert_eq!(new.config.send_reset_has_reason, 1);
        assert_eq!(new.config.sock_flag_linger, 6);
        assert_eq!(new.config.tp_rcv_nxt, 1540);
        assert_eq!(new.config.tw_rcv_nxt, 104);
        assert_eq!(
            new.rst_reason(9),
            KReason::Known(RstReason::TcpAbortOnClose)
        );
        assert_eq!(new.rst_reason(77), KReason::Unknown(77));
        assert_eq!(new.tw_status(3), KTwStatus::Known(TwStatus::Syn));
        assert_eq!(new.tw_status(-1), KTwStatus::Unknown(-1));
        // The table is rebuilt when a recording's facts are read back.
        let back: KernelFacts =
            serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
        assert_eq!(back.rst_reason(9), new.rst_reason(9));
        assert_eq!(
            back,
            KernelFacts {
                config: back.config,
                ..new.clone()
            }
        );
        assert_eq!(
            new.tracepoints["tcp_send_reset"],
            vec!["sk".to_string(), "skb".into(), "reason".into()]
        );

        let d = new.detected();
        assert_eq!(d.passive_reset_reasons, Some(true));
        assert_eq!(d.active_reset_argument, Some(true));
        assert_eq!(d.tw_ack_oow, Some(false));
        assert_eq!(
            d.tw_isn_argument, None,
            "no tcp_timewait_state_process in this BTF"
        );
        let old =
            KernelFacts::from_btf(&KernelBtf::from_bytes(&fake_kernel(false)).unwrap()).unwrap();
        let d = old.detected();
        assert_eq!(d.passive_reset_reasons, Some(false));
        assert_eq!(d.active_reset_argument, Some(false));
        // A 6.12 release number on a kernel whose BTF has no reasons: modelled without them.
        let g = crate::model::KernelGeneration::from_version(6, 12, 0).with_detected(d);
        assert!(!g.passive_reset_reasons && !g.active_reset_reasons);
        assert_eq!(old.config.active_reset_reason_arg, 0);
        assert_eq!(old.config.send_reset_has_reason, 0);
        assert!(old.rst_reason_names().is_empty());
        assert_eq!(old.functions["tcp_send_active_reset"].len(), 2);
        assert!(!old.functions.contains_key("tcp_fin"));

        // Descriptor -> socket offsets, and both ways files count references.
        let c = new.config;
        assert_eq!(c.fd_to_sock, 1);
        assert_eq!(
            (c.task_files, c.files_fdt, c.fdt_fd, c.fdt_max_fds),
            (2000, 32, 8, 0)
        );
        assert_eq!(
            (c.file_inode, c.inode_mode, c.file_private_data, c.socket_sk),
            (32, 0, 200, 24)
        );
        assert_eq!(
            (c.file_refs, c.file_refs_one, c.file_refs_known),
            (56, 0, 1)
        );
        let c = old.config;
        assert_eq!(
            (c.file_refs, c.file_refs_one, c.file_refs_known),
            (56, 1, 1)
        );
        // A socketless reply's namespace: sk_buff.dev (in an anonymous union), net_device.nd_net.
        assert_eq!((c.skb_dev, c.dev_nd_net, c.skb_netns_known), (16, 280, 1));
    }

    #[test]
    fn without_descriptor_structs_owners_come_from_socket_events_only() {
        let mut b = super::testing::BtfBuilder::new();
        let u32_ = b.int("unsigned int", 4);
        b.strukt("fdtable", 8, &[("max_fds", u32_, 0)]);
        let c = fd_offsets(&KernelBtf::from_bytes(&b.build()).unwrap());
        assert_eq!(
            (c.fd_to_sock, c.file_refs_known, c.skb_netns_known),
            (0, 0, 0)
        );
    }

    #[test]
    fn reason_argument_is_found_by_name() {
        // Debian's 6.12 build: gcc dropped the unused gfp_t, BTF shows (sk, reason).
        let mut b = super::testing::BtfBuilder::new();
        let u32_ = b.int("unsigned int", 4);
        let p = b.ptr(u32_);
        let proto = b.func_proto(0, &[("sk", p), ("reason", u32_)]);
        b.func("tcp_send_active_reset", proto);
        let btf = KernelBtf::from_bytes(&b.build()).unwrap();
        let params = btf
            .function_params("tcp_send_active_reset")
            .unwrap()
            .unwrap();
        assert_eq!(params.iter().position(|n| n == "reason"), Some(1));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(KernelBtf::from_bytes(b"not btf").is_err());
        assert!(KernelBtf::from_bytes(&[]).is_err());
    }
}
