//! `tcp-trace doctor`: what this kernel allows, and for every hook which mechanism works or why
//! none does. It attaches each program once and detaches it again.

use anyhow::Result;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde_json::json;

use tcp_trace_common::AnyHook;

use crate::{
    attach::{self, Mechanism},
    kernel::{self, btf::KernelBtf, btf::KernelFacts},
};

pub fn run(json_out: bool) -> Result<u8> {
    let release = kernel::kernel_release();
    let privileges = kernel::Privileges::current();
    let btf_bytes = kernel::read_vmlinux_btf();
    let lockdown = kernel::lockdown();
    let kprobes = attach::kprobes_available();
    let mut lines: Vec<(String, String)> = vec![
        ("kernel".into(), release.clone()),
        (
            "BTF".into(),
            match &btf_bytes {
                Ok(b) => format!("{} ({} KiB)", kernel::VMLINUX_BTF, b.len() / 1024),
                Err(e) => format!("MISSING: {e:#}"),
            },
        ),
        ("lockdown".into(), lockdown),
        ("privileges".into(), privileges.describe()),
        (
            "kprobes".into(),
            if kprobes {
                "available"
            } else {
                "not available (CONFIG_KPROBES off)"
            }
            .into(),
        ),
    ];
    let facts = match &btf_bytes {
        Ok(b) => match KernelBtf::from_bytes(b).and_then(|btf| KernelFacts::from_btf(&btf)) {
            Ok(f) => Some(f),
            Err(e) => {
                lines.push(("layout".into(), format!("UNUSABLE: {e:#}")));
                None
            }
        },
        Err(_) => None,
    };
    if let Some(f) = &facts {
        lines.push((
            "reset reasons".into(),
            if f.rst_reason_names().is_empty() {
                "not in this kernel (tcp_send_reset has no reason before 6.10)".into()
            } else {
                format!("{} names in enum sk_rst_reason", f.rst_reason_names().len())
            },
        ));
        lines.push((
            "tw_status".into(),
            f.tw_status_names()
                .values()
                .cloned()
                .collect::<Vec<_>>()
                .join(" "),
        ));
    }
    if let Some(f) = &facts {
        lines.push(("owners".into(), owner_learning(&f.config)));
    }
    if privileges.sufficient() {
        match kernel::ensure_tracefs() {
            Ok(note) => lines.push(("tracefs".into(), note)),
            Err(e) => lines.push(("tracefs".into(), format!("{e:#}"))),
        }
    }

    let mut probes = None;
    let mut probe_error = None;
    if let Some(f) = &facts {
        if privileges.sufficient() {
            match attach::probe_all(f) {
                Ok(p) => probes = Some(p),
                Err(e) => probe_error = Some(format!("{e:#}")),
            }
        } else {
            probe_error = Some(format!("{:#}", privileges.require().unwrap_err()));
        }
    }

    let mut rows = Vec::new();
    let mut owner_rows = Vec::new();
    let mut usable = 0;
    if let Some(probes) = &probes {
        for (hook, results) in probes {
            let signature = facts.as_ref().and_then(|f| match hook {
                AnyHook::Event(h) if h.is_function() => f
                    .functions
                    .get(h.target())
                    .map(|p| format!("({})", p.join(", "))),
                AnyHook::Event(h) => f
                    .tracepoints
                    .get(h.target())
                    .map(|p| format!("{} args", p.len())),
                AnyHook::Aux(_) => None,
            });
            let cell = |m: Mechanism, r: &Result<(), String>| match r {
                Ok(()) => format!("{m}: ok"),
                Err(e) => format!("{m}: {e}"),
            };
            let auto = results.iter().find(|(_, r)| r.is_ok()).map(|(m, _)| *m);
            let row = json!({
                "hook": hook.name(),
                "signature": signature,
                "mechanisms": results.iter().map(|(m, r)| json!({
                    "mechanism": m, "ok": r.is_ok(), "error": r.as_ref().err(),
                })).collect::<Vec<_>>(),
                "auto": auto,
                "cells": results.iter().map(|(m, r)| cell(*m, r)).collect::<Vec<_>>(),
            });
            match hook {
                AnyHook::Event(_) => {
                    usable += auto.is_some() as usize;
                    rows.push(row);
                }
                AnyHook::Aux(_) => owner_rows.push(row),
            }
        }
    }

    if json_out {
        let out = json!({
            "type": "doctor",
            "system": lines.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "hooks": rows,
            "owner_hooks": owner_rows,
            "error": probe_error,
            "usable_hooks": usable,
        });
        println!("{out}");
    } else {
        for (k, v) in &lines {
            println!("{k:>14}: {v}");
        }
        if let Some(e) = &probe_error {
            println!("\ncannot test the hooks: {e}");
        }
        if !rows.is_empty() {
            let mut table = Table::new();
            table.load_preset(UTF8_FULL_CONDENSED);
            table.set_width(160);
            table.set_header([
                "hook",
                "BTF signature",
                "trampoline / tp_btf",
                "kprobe / raw_tp",
                "auto uses",
            ]);
            for r in &rows {
                let cells = r["cells"].as_array().cloned().unwrap_or_default();
                table.add_row([
                    r["hook"].as_str().unwrap_or("").to_string(),
                    r["signature"].as_str().unwrap_or("not in BTF").to_string(),
                    cells
                        .first()
                        .and_then(|c| c.as_str())
                        .unwrap_or("")
                        .to_string(),
                    cells
                        .get(1)
                        .and_then(|c| c.as_str())
                        .unwrap_or("")
                        .to_string(),
                    r["auto"].as_str().unwrap_or("none").to_string(),
                ]);
            }
            println!("\n{table}");
            println!("{usable}/{} hooks usable with --backend auto", rows.len());
        }
        if !owner_rows.is_empty() {
            let mut table = Table::new();
            table.load_preset(UTF8_FULL_CONDENSED);
            table.set_width(160);
            table.set_header(["owner hook", "mechanisms", "auto uses"]);
            for r in &owner_rows {
                let cells: Vec<&str> = r["cells"]
                    .as_array()
                    .map(|c| c.iter().filter_map(|c| c.as_str()).collect())
                    .unwrap_or_default();
                table.add_row([
                    r["hook"].as_str().unwrap_or("").to_string(),
                    cells.join("\n"),
                    r["auto"].as_str().unwrap_or("none").to_string(),
                ]);
            }
            println!("\n{table}");
        }
    }
    Ok(if usable > 0 { 0 } else { 1 })
}

/// How this kernel lets tcp-trace learn who holds each socket (the README's "Owners").
fn owner_learning(c: &tcp_trace_common::Config) -> String {
    let mut how = vec![
        "connect/listen/shutdown/close state changes (process context)".to_string(),
        "inet_csk_accept:return where a function hook attaches".to_string(),
    ];
    if c.fd_to_sock != 0 {
        how.push(
            "accept()/accept4() and close() by descriptor (syscall tracepoints; task_struct.files \
             -> fdtable -> file -> socket offsets from BTF)"
                .to_string(),
        );
        how.push(if c.file_refs_known != 0 {
            format!(
                "a close() that leaves other holders (file.{} from BTF) makes the owner provisional",
                if c.file_refs_one == 0 { "f_ref" } else { "f_count" }
            )
        } else {
            "BTF has neither file.f_count nor file.f_ref: every close() of a TCP descriptor is \
             taken as its holder's"
                .to_string()
        });
    } else {
        how.push(
            "NOT by descriptor: BTF lacks the task_struct.files -> socket path, so owners come \
             from socket events only"
                .to_string(),
        );
    }
    how.join("; ")
}
