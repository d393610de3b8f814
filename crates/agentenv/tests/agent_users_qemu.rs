//! A real QEMU guest (the artifacts' kernel and `minimal.ext4`, its agent):
//! file requests made as a guest user get the guest kernel's permission
//! checks, as E2B's envd gives them; root's stay as they were.

mod common;

use agentenv_core::error::EngineError;
use agentenv_proto::{FsOp, FsRequest, GetFile, PutFile};
use common::{finish, Daemon, TestDir};

async fn put(d: &Daemon, path: &str, mode: u32, user: Option<&str>) -> Result<(), EngineError> {
    let mut up = d
        .engine
        .put_file_as(
            "u1",
            &PutFile {
                path: path.into(),
                mode: Some(mode),
                make_parents: true,
                user: user.map(str::to_string),
            },
        )
        .await?;
    up.write(b"guest data").await.map_err(EngineError::from)?;
    up.finish().await.map_err(EngineError::from)?;
    Ok(())
}

async fn get(d: &Daemon, path: &str, user: Option<&str>) -> Result<Vec<u8>, EngineError> {
    let mut dl = d
        .engine
        .get_file_as(
            "u1",
            &GetFile {
                path: path.into(),
                user: user.map(str::to_string),
            },
        )
        .await?;
    let mut got = Vec::new();
    while let Some(c) = dl.next_chunk().await.map_err(EngineError::from)? {
        got.extend(c);
    }
    Ok(got)
}

#[track_caller]
fn forbidden<T: std::fmt::Debug>(r: Result<T, EngineError>, path: &str) {
    match r {
        Err(e @ EngineError::Forbidden { .. }) => {
            assert!(e.to_string().contains(path), "the error names {path}: {e}")
        }
        other => panic!("expected permission denied on {path}, got {other:?}"),
    }
}

#[test]
fn a_guest_user_gets_the_guest_kernels_permission_checks() {
    let art = need_artifacts!();
    let mut dir = TestDir::new();
    let mut cfg = common::qemu_config(&dir, &art);
    cfg.agent.ready_timeout_s = common::GUEST_BOOT_TIMEOUT.as_secs();
    dir.baseline = Some(common::baseline(dir.path()));
    let d = Daemon::start_with(cfg, dir.path());
    common::boot_ready(&d, "u1");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let fs = |user: Option<&str>, op: FsOp| {
        let req = FsRequest {
            user: user.map(str::to_string),
            op,
        };
        rt.block_on(d.engine.agent_fs("u1", &req))
    };
    let nobody = Some("nobody");

    // Root's 0600 file in a root-owned 0755 directory.
    rt.block_on(put(&d, "/srv/secret", 0o600, None)).unwrap();
    forbidden(rt.block_on(get(&d, "/srv/secret", nobody)), "/srv/secret");
    forbidden(rt.block_on(put(&d, "/srv/new", 0o644, nobody)), "/srv/new");
    forbidden(
        fs(
            nobody,
            FsOp::MakeDir {
                path: "/srv/d".into(),
            },
        ),
        "/srv/d",
    );
    forbidden(
        fs(
            nobody,
            FsOp::Remove {
                path: "/srv/secret".into(),
            },
        ),
        "/srv/secret",
    );
    // Root, named or not, as before.
    for user in [None, Some("root")] {
        assert_eq!(
            rt.block_on(get(&d, "/srv/secret", user)).unwrap(),
            b"guest data"
        );
    }

    // In /tmp nobody makes its own, and reads it back.
    rt.block_on(put(&d, "/tmp/nobody/up/f.txt", 0o600, nobody))
        .unwrap();
    assert_eq!(
        rt.block_on(get(&d, "/tmp/nobody/up/f.txt", nobody))
            .unwrap(),
        b"guest data"
    );
    for p in ["/tmp/nobody", "/tmp/nobody/up/f.txt"] {
        let e = fs(None, FsOp::Stat { path: p.into() })
            .unwrap()
            .entry
            .unwrap();
        assert_eq!(e.owner, "nobody", "{p}: {e:?}");
    }
    let made = fs(
        nobody,
        FsOp::MakeDir {
            path: "/tmp/nobody/d".into(),
        },
    )
    .unwrap()
    .entry
    .unwrap();
    assert_eq!(made.owner, "nobody");
    // Root still reads what is nobody's.
    rt.block_on(get(&d, "/tmp/nobody/up/f.txt", None)).unwrap();
    drop(rt);
    finish(d, dir);
}
