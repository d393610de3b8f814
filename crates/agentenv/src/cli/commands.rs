//! The client commands: each a call of the API through [`ApiClient`], its
//! answer printed by [`super::render`].

use agentenv_api::{ExecEvent, ExecRequest};
use agentenv_client::{ApiClient, UploadOptions};
use anyhow::{anyhow, Context};

use super::args::{guest_side, ClientOpts, CpArgs, ExecArgs, SnapshotCommand, VmCommand};
use super::render::{
    print_as, print_deleted, print_snapshot, print_vm, write_snapshot_table, write_table,
};

/// Runs one `vm` command, printing its result.
pub fn run_vm(opts: &ClientOpts, cmd: VmCommand) -> anyhow::Result<()> {
    let c = opts.client()?;
    let out = std::io::stdout();
    let mut out = out.lock();
    match cmd {
        VmCommand::Create(args) => print_vm(&mut out, opts, &c.create_vm(&args.request()?)?),
        VmCommand::Ls => {
            let list = c.list_vms()?;
            print_as(&mut out, opts, &list, |out, l| write_table(out, &l.vms))
        }
        VmCommand::Show { vm_id } => print_vm(&mut out, opts, &c.get_vm(&vm_id)?),
        VmCommand::Pause { vm_id } => print_vm(&mut out, opts, &c.pause_vm(&vm_id)?),
        VmCommand::Resume { vm_id } => print_vm(&mut out, opts, &c.resume_vm(&vm_id)?),
        VmCommand::Shutdown { vm_id } => print_vm(&mut out, opts, &c.shutdown_vm(&vm_id)?),
        VmCommand::Rm { vm_id } => {
            c.delete_vm(&vm_id)?;
            print_deleted(&mut out, opts, &vm_id)
        }
        VmCommand::Snapshot {
            vm_id,
            snapshot_id,
            memory,
        } => {
            let req = agentenv_api::CreateSnapshotRequest {
                snapshot_id,
                memory,
            };
            print_snapshot(&mut out, opts, &c.snapshot_vm_with(&vm_id, &req)?)
        }
        VmCommand::Restore {
            vm_id,
            snapshot_id,
            wait_ready,
        } => print_vm(
            &mut out,
            opts,
            &c.restore_vm(&vm_id, &snapshot_id, wait_ready)?,
        ),
        VmCommand::Fork {
            vm_id,
            count,
            vm_ids,
        } => {
            let forked = c.fork_vm(&vm_id, &agentenv_api::ForkRequest { count, vm_ids })?;
            print_as(&mut out, opts, &forked, |out, f| write_table(out, &f.vms))
        }
        VmCommand::Reset { vm_id, snapshot_id } => {
            print_vm(&mut out, opts, &c.reset_vm(&vm_id, &snapshot_id)?)
        }
        VmCommand::Exec(args) => {
            drop(out);
            let code = run_exec(&c, args)?;
            std::process::exit(code);
        }
        VmCommand::Cp(args) => run_cp(&c, opts, &mut out, args),
    }
}

/// `vm exec`: streams the command's output to ours and returns its exit status.
fn run_exec(c: &ApiClient, args: ExecArgs) -> anyhow::Result<i32> {
    use std::io::Read;
    let stdin = if args.stdin {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading stdin")?;
        Some(agentenv_api::base64::encode(&buf))
    } else {
        None
    };
    let req = ExecRequest {
        cmd: args.cmd,
        env: args.env.into_iter().collect(),
        cwd: args.cwd,
        stdin: None,
        stdin_base64: stdin,
        timeout_s: args.timeout,
        stream: true,
    };
    let mut code = None;
    for ev in c.exec_stream(&args.vm_id, &req)? {
        match ev? {
            ExecEvent::Started { .. } => {}
            ExecEvent::Stdout { data } | ExecEvent::Stderr { data } if data.is_empty() => {}
            ExecEvent::Stdout { data } => copy_output(&data, &mut std::io::stdout().lock())?,
            ExecEvent::Stderr { data } => copy_output(&data, &mut std::io::stderr().lock())?,
            ExecEvent::Exit {
                exit_code,
                signal,
                timed_out,
                ..
            } => {
                code = Some(if timed_out {
                    eprintln!("agentenv: the command timed out and was killed");
                    124
                } else {
                    match (exit_code, signal) {
                        (Some(c), _) => c,
                        (None, Some(s)) => 128 + s,
                        (None, None) => 1,
                    }
                });
            }
            ExecEvent::Error { error } => return Err(anyhow!("{error}")),
        }
    }
    code.ok_or_else(|| anyhow!("the output ended without the command's exit status"))
}

/// `vm cp`: one side local, the other `VM:/PATH`.
fn run_cp(
    c: &ApiClient,
    opts: &ClientOpts,
    out: &mut impl std::io::Write,
    args: CpArgs,
) -> anyhow::Result<()> {
    let mode = match &args.mode {
        Some(m) => Some(
            u32::from_str_radix(m, 8)
                .map_err(|_| anyhow!("--mode {m:?} is not an octal number"))?,
        ),
        None => None,
    };
    match (guest_side(&args.src), guest_side(&args.dst)) {
        (None, Some((vm, path))) => {
            // A file is sent with its length; stdin, chunked up to its end.
            let (reader, len, local_mode): (Box<dyn std::io::Read>, _, _) = if args.src == "-" {
                (Box::new(std::io::stdin()), None, None)
            } else {
                let f = std::fs::File::open(&args.src)
                    .with_context(|| format!("cannot open {}", args.src))?;
                use std::os::unix::fs::PermissionsExt;
                let meta = f.metadata().ok();
                let len = meta.as_ref().filter(|m| m.is_file()).map(|m| m.len());
                let m = meta.map(|m| m.permissions().mode() & 0o7777);
                (Box::new(f), len, m)
            };
            let upload = UploadOptions {
                mode: mode.or(local_mode),
                make_parents: args.parents,
            };
            let done = c.upload(vm, path, &upload, reader, len)?;
            print_as(out, opts, &done, |out, done| {
                Ok(writeln!(
                    out,
                    "wrote {} bytes to {vm}:{}",
                    done.bytes, done.path
                )?)
            })
        }
        (Some((vm, path)), None) => {
            if args.mode.is_some() || args.parents {
                return Err(anyhow!("--mode and --parents apply to uploads only"));
            }
            let mut body = c.download(vm, path)?;
            if args.dst == "-" {
                std::io::copy(&mut body, &mut std::io::stdout().lock())
                    .context("writing to stdout")?;
                return Ok(());
            }
            // Written beside the target and renamed, so a failed copy leaves nothing.
            let dst = std::path::Path::new(&args.dst);
            let dst = if dst.is_dir() {
                dst.join(path.rsplit('/').next().unwrap_or("file"))
            } else {
                dst.to_path_buf()
            };
            let tmp = dst.with_file_name(format!(
                ".{}.agentenv-cp",
                dst.file_name().and_then(|n| n.to_str()).unwrap_or("file")
            ));
            let copy = (|| -> anyhow::Result<u64> {
                let mut f = std::fs::File::create(&tmp)
                    .with_context(|| format!("cannot create {}", tmp.display()))?;
                let n = std::io::copy(&mut body, &mut f)
                    .with_context(|| format!("copying {vm}:{path}"))?;
                f.sync_all()?;
                std::fs::rename(&tmp, &dst)
                    .with_context(|| format!("cannot rename into {}", dst.display()))?;
                Ok(n)
            })();
            let n = copy.inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })?;
            let v = serde_json::json!({"path": dst, "bytes": n});
            print_as(out, opts, &v, |out, _| {
                Ok(writeln!(out, "wrote {n} bytes to {}", dst.display())?)
            })
        }
        (Some(_), Some(_)) => Err(anyhow!(
            "copy between two VMs is not supported; go through the host"
        )),
        (None, None) => Err(anyhow!("one side must be VM:/ABSOLUTE_PATH")),
    }
}

/// Runs one `snapshot` command, printing its result.
pub fn run_snapshot(opts: &ClientOpts, cmd: SnapshotCommand) -> anyhow::Result<()> {
    let c = opts.client()?;
    let out = std::io::stdout();
    let mut out = out.lock();
    match cmd {
        SnapshotCommand::Ls => {
            let list = c.list_snapshots()?;
            print_as(&mut out, opts, &list, |out, l| {
                write_snapshot_table(out, &l.snapshots)
            })
        }
        SnapshotCommand::Show { snapshot_id } => {
            print_snapshot(&mut out, opts, &c.get_snapshot(&snapshot_id)?)
        }
        SnapshotCommand::Persist {
            snapshot_id,
            keep_tmpfs,
        } => print_snapshot(
            &mut out,
            opts,
            &c.persist_snapshot(&snapshot_id, keep_tmpfs)?,
        ),
        SnapshotCommand::Rm { snapshot_id } => {
            c.delete_snapshot(&snapshot_id)?;
            print_deleted(&mut out, opts, &snapshot_id)
        }
    }
}

/// Decodes one base64 piece of a command's output and writes it through.
fn copy_output(data: &str, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let b = agentenv_api::base64::decode(data).ok_or_else(|| anyhow!("bad base64 output"))?;
    out.write_all(&b)?;
    out.flush()?;
    Ok(())
}
