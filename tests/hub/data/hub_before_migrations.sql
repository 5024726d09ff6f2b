BEGIN TRANSACTION;
CREATE TABLE alerts (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    key TEXT,
    subject TEXT NOT NULL,
    message TEXT NOT NULL,
    detail TEXT NOT NULL,
    fired REAL NOT NULL,
    cleared REAL,
    delivered TEXT NOT NULL
);
INSERT INTO "alerts" VALUES('al1','job_failed',NULL,'backup failed','m','{}',1796450250.0,NULL,'{}');
INSERT INTO "alerts" VALUES('al2','low_space','/repo','space low','m','{}',1796450250.0,NULL,'{}');
CREATE TABLE job_samples (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    t REAL NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (job_id, seq)
);
INSERT INTO "job_samples" VALUES('20261205-055729-a67bf30c',0,1.79645024994930124287e+09,1048576);
INSERT INTO "job_samples" VALUES('20261205-055729-a67bf30c',1,1.7964502499548277855e+09,2097152);
INSERT INTO "job_samples" VALUES('20261205-055729-a67bf30c',2,1.79645024995989227296e+09,2097152);
INSERT INTO "job_samples" VALUES('20261205-055729-000b7c60',0,1.7964502500167696476e+09,1048576);
INSERT INTO "job_samples" VALUES('20261205-055729-000b7c60',1,1.79645025002378964417e+09,2097152);
INSERT INTO "job_samples" VALUES('20261205-055729-000b7c60',2,1.79645025003067922587e+09,2097152);
INSERT INTO "job_samples" VALUES('20261205-055730-5053960f',0,1.79645025008059620852e+09,1048576);
INSERT INTO "job_samples" VALUES('20261205-055730-5053960f',1,1.79645025008881235126e+09,2097152);
INSERT INTO "job_samples" VALUES('20261205-055730-5053960f',2,1.79645025010447335241e+09,2097152);
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    vm_path TEXT NOT NULL,
    mode TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    deadline REAL NOT NULL,
    detail TEXT NOT NULL,
    progress TEXT,
    error TEXT
, node TEXT, policy TEXT, full_reason TEXT, stages TEXT, bytes_changed INTEGER, bytes_sent INTEGER, expected_bytes INTEGER);
INSERT INTO "jobs" VALUES('20261205-055729-a67bf30c','backup','/DC/vm/a1','full','completed',1.79645024993281340604e+09,1.79645024995994758605e+09,1.79653664993281340597e+09,'{"disks": [{"disk_key": 2000, "port": 23100, "export": "20261205-055729-a67bf30c-2000", "uri": "nbd://127.0.0.1:23100/20261205-055729-a67bf30c-2000", "point_id": "20261205T055729Z-06bddcfe", "sync_type": "full", "base_point": null, "bytes_changed": 1048576, "bytes_transferred": 1048576, "full_reason": "first_backup", "full_reason_detail": null}, {"disk_key": 2001, "port": 23101, "export": "20261205-055729-a67bf30c-2001", "uri": "nbd://127.0.0.1:23101/20261205-055729-a67bf30c-2001", "point_id": "20261205T055729Z-806b85f0", "sync_type": "full", "base_point": null, "bytes_changed": 1048576, "bytes_transferred": 1048576, "full_reason": "first_backup", "full_reason_detail": null}]}','{"job_id": "20261205-055729-a67bf30c", "stage": "transferring", "status": "running", "bytes_transferred": 2097152, "total_bytes": 6291456, "percent": 10.0}',NULL,NULL,NULL,'first_backup','[{"name": "queued", "started": 1796450249.9328153, "ended": 1796450249.9493012, "hub": true}, {"name": "transferring", "started": 1796450249.9493012, "ended": 1796450249.95736, "hub": false}, {"name": "completing", "started": 1796450249.95736, "ended": 1796450249.9598923, "hub": true}, {"name": "retention", "started": 1796450249.9619606, "ended": 1796450249.994884, "hub": true}]',2097152,2097152,6291456);
INSERT INTO "jobs" VALUES('20261205-055729-000b7c60','backup','/DC/vm/a1','auto','completed',1.79645024997481274602e+09,1.79645025003074622154e+09,1.79653664997481274604e+09,'{"disks": [{"disk_key": 2000, "port": 23100, "export": "20261205-055729-000b7c60-2000", "uri": "nbd://127.0.0.1:23100/20261205-055729-000b7c60-2000", "point_id": "20261205T055729Z-e6cbb590", "sync_type": "incremental", "base_point": "20261205T055729Z-06bddcfe", "bytes_changed": 1048576, "bytes_transferred": 1048576, "full_reason": null, "full_reason_detail": null}, {"disk_key": 2001, "port": 23101, "export": "20261205-055729-000b7c60-2001", "uri": "nbd://127.0.0.1:23101/20261205-055729-000b7c60-2001", "point_id": "20261205T055729Z-09531bac", "sync_type": "incremental", "base_point": "20261205T055729Z-806b85f0", "bytes_changed": 1048576, "bytes_transferred": 1048576, "full_reason": null, "full_reason_detail": null}]}','{"job_id": "20261205-055729-000b7c60", "stage": "transferring", "status": "running", "bytes_transferred": 2097152, "total_bytes": 6291456, "percent": 10.0}',NULL,NULL,NULL,NULL,'[{"name": "queued", "started": 1796450249.9748147, "ended": 1796450250.0167696, "hub": true}, {"name": "transferring", "started": 1796450250.0167696, "ended": 1796450250.0281227, "hub": false}, {"name": "completing", "started": 1796450250.0281227, "ended": 1796450250.0306792, "hub": true}, {"name": "retention", "started": 1796450250.0352368, "ended": 1796450250.0642238, "hub": true}]',2097152,2097152,2097152);
INSERT INTO "jobs" VALUES('20261205-055730-5053960f','backup','/DC/vm/a2','full','completed',1.79645025004764437672e+09,1.79645025010453724865e+09,1.79653665004764437678e+09,'{"disks": [{"disk_key": 2000, "port": 23100, "export": "20261205-055730-5053960f-2000", "uri": "nbd://127.0.0.1:23100/20261205-055730-5053960f-2000", "point_id": "20261205T055730Z-8f2baeab", "sync_type": "full", "base_point": null, "bytes_changed": 1048576, "bytes_transferred": 1048576, "full_reason": "first_backup", "full_reason_detail": null}, {"disk_key": 2001, "port": 23101, "export": "20261205-055730-5053960f-2001", "uri": "nbd://127.0.0.1:23101/20261205-055730-5053960f-2001", "point_id": "20261205T055730Z-9d6b5532", "sync_type": "full", "base_point": null, "bytes_changed": 1048576, "bytes_transferred": 1048576, "full_reason": "first_backup", "full_reason_detail": null}]}','{"job_id": "20261205-055730-5053960f", "stage": "transferring", "status": "running", "bytes_transferred": 2097152, "total_bytes": 6291456, "percent": 10.0}',NULL,NULL,NULL,'first_backup','[{"name": "queued", "started": 1796450250.0476465, "ended": 1796450250.0805962, "hub": true}, {"name": "transferring", "started": 1796450250.0805962, "ended": 1796450250.0915875, "hub": false}, {"name": "completing", "started": 1796450250.0915875, "ended": 1796450250.1044734, "hub": true}, {"name": "retention", "started": 1796450250.1077588, "ended": 1796450250.1241362, "hub": true}]',2097152,2097152,6291456);
INSERT INTO "jobs" VALUES('20261205-055730-651466b9','backup','/DC/vm/a3','full','cancelled',1.79645025011880207061e+09,1.79645025017434668539e+09,1.79653665011880207067e+09,'{"disks": [{"disk_key": 2000, "port": 23100, "export": "20261205-055730-651466b9-2000", "uri": "nbd://127.0.0.1:23100/20261205-055730-651466b9-2000", "point_id": "20261205T055730Z-5c52a11f", "sync_type": "full", "base_point": null, "bytes_changed": null, "bytes_transferred": null, "full_reason": "first_backup", "full_reason_detail": null}, {"disk_key": 2001, "port": 23101, "export": "20261205-055730-651466b9-2001", "uri": "nbd://127.0.0.1:23101/20261205-055730-651466b9-2001", "point_id": "20261205T055730Z-1969f39b", "sync_type": "full", "base_point": null, "bytes_changed": null, "bytes_transferred": null, "full_reason": "first_backup", "full_reason_detail": null}]}',NULL,'{"stage": "cancelled", "code": "cancelled", "message": "cancelled by the API"}',NULL,NULL,'first_backup','[{"name": "queued", "started": 1796450250.1188045, "ended": 1796450250.1742465, "hub": true}]',NULL,NULL,6291456);
INSERT INTO "jobs" VALUES('20261205-055730-e8a34c71','backup','/DC/vm/a4','full','running',1.79645025017846703529e+09,1.79645025019406890873e+09,1.79653665017846703522e+09,'{"disks": [{"disk_key": 2000, "port": 23100, "export": "20261205-055730-e8a34c71-2000", "uri": "nbd://127.0.0.1:23100/20261205-055730-e8a34c71-2000", "point_id": "20261205T055730Z-a6dbca58", "sync_type": "full", "base_point": null, "bytes_changed": null, "bytes_transferred": null, "full_reason": "first_backup", "full_reason_detail": null}, {"disk_key": 2001, "port": 23101, "export": "20261205-055730-e8a34c71-2001", "uri": "nbd://127.0.0.1:23101/20261205-055730-e8a34c71-2001", "point_id": "20261205T055730Z-0f06c8fa", "sync_type": "full", "base_point": null, "bytes_changed": null, "bytes_transferred": null, "full_reason": "first_backup", "full_reason_detail": null}]}',NULL,NULL,NULL,NULL,'first_backup','[{"name": "queued", "started": 1796450250.1784685, "ended": null, "hub": true}]',NULL,NULL,6291456);
CREATE TABLE leases (
    port INTEGER PRIMARY KEY,
    holder TEXT NOT NULL,
    job_id TEXT NOT NULL,
    disk_key INTEGER,
    purpose TEXT NOT NULL,
    since REAL NOT NULL,
    expires REAL NOT NULL
);
INSERT INTO "leases" VALUES(23100,'hub-vm-7209-cf3f2a','20261205-055730-e8a34c71',2000,'backup',1.79645025018272852892e+09,1.79645085018272852896e+09);
INSERT INTO "leases" VALUES(23101,'hub-vm-7209-cf3f2a','20261205-055730-e8a34c71',2001,'backup',1.79645025019288110735e+09,1.79645085019288110739e+09);
CREATE TABLE nodes (
    name TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    token TEXT,
    tunnel_identity TEXT,
    configured TEXT NOT NULL,
    added REAL NOT NULL,
    last_contact REAL,
    last_check REAL,
    up INTEGER,
    version TEXT,
    running_jobs INTEGER,
    queued_jobs INTEGER,
    max_jobs INTEGER,
    last_error TEXT
, transport TEXT NOT NULL DEFAULT 'tunnel', nbd_host TEXT, hub_url TEXT, tls_pinned INTEGER NOT NULL DEFAULT 0);
INSERT INTO "nodes" VALUES('site-b','http://127.0.0.1:9','tok',NULL,'api',1.7964502499181632996e+09,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'tunnel',NULL,NULL,0);
CREATE TABLE offsite_copies (
        id TEXT PRIMARY KEY, policy TEXT NOT NULL, point_id TEXT NOT NULL, vm_path TEXT NOT NULL,
        disk_key INTEGER NOT NULL, chain_id TEXT, state TEXT NOT NULL, error TEXT, created REAL NOT NULL,
        completed REAL, manifest TEXT, manifest_version TEXT, sealed INTEGER NOT NULL DEFAULT 0, target TEXT);
CREATE TABLE offsite_objects (
        copy_id TEXT NOT NULL, key TEXT NOT NULL, version TEXT NOT NULL, until REAL NOT NULL,
        PRIMARY KEY (copy_id, key, version));
INSERT INTO "offsite_objects" VALUES('c1','k/img','v1',1796450300.0);
INSERT INTO "offsite_objects" VALUES('c1','k/img','v0',1796450300.0);
CREATE TABLE offsite_uploads (
        bucket TEXT NOT NULL, key TEXT NOT NULL, upload TEXT NOT NULL, part_size INTEGER NOT NULL,
        parts TEXT NOT NULL, copy_id TEXT, PRIMARY KEY (bucket, key));
CREATE TABLE points (
    id TEXT PRIMARY KEY,
    vm_path TEXT NOT NULL,
    disk_key INTEGER NOT NULL,
    job_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    backing TEXT,
    size INTEGER NOT NULL,
    change_id TEXT,
    disk_uuid TEXT,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    completed REAL,
    bytes_changed INTEGER,
    bytes_transferred INTEGER
, verify_state TEXT, verified_at REAL, bad_offset INTEGER, verify_error TEXT, digests TEXT);
INSERT INTO "points" VALUES('20261205T055729Z-06bddcfe','/DC/vm/a1',2000,'20261205-055729-a67bf30c','full','/tmp/dbgen/repo/vms/DC_vm_a1-5a4d7a35/2000/20261205T055729Z-06bddcfe.qcow2',NULL,4194304,'52 aa/1-2000',NULL,'completed',1.79645024993657112123e+09,1.79645024995909476277e+09,1048576,1048576,'unverified',NULL,NULL,NULL,'20261205T055729Z-06bddcfe.digests');
INSERT INTO "points" VALUES('20261205T055729Z-806b85f0','/DC/vm/a1',2001,'20261205-055729-a67bf30c','full','/tmp/dbgen/repo/vms/DC_vm_a1-5a4d7a35/2001/20261205T055729Z-806b85f0.qcow2',NULL,2097152,'52 aa/1-2001',NULL,'completed',1.7964502499448442459e+09,1.79645024995909476277e+09,1048576,1048576,'unverified',NULL,NULL,NULL,'20261205T055729Z-806b85f0.digests');
INSERT INTO "points" VALUES('20261205T055729Z-e6cbb590','/DC/vm/a1',2000,'20261205-055729-000b7c60','incremental','/tmp/dbgen/repo/vms/DC_vm_a1-5a4d7a35/2000/20261205T055729Z-e6cbb590.qcow2','20261205T055729Z-06bddcfe',4194304,'52 aa/2-2000',NULL,'completed',1.79645024999093532564e+09,1.79645025002970695499e+09,1048576,1048576,'unverified',NULL,NULL,NULL,'20261205T055729Z-e6cbb590.digests');
INSERT INTO "points" VALUES('20261205T055729Z-09531bac','/DC/vm/a1',2001,'20261205-055729-000b7c60','incremental','/tmp/dbgen/repo/vms/DC_vm_a1-5a4d7a35/2001/20261205T055729Z-09531bac.qcow2','20261205T055729Z-806b85f0',2097152,'52 aa/2-2001',NULL,'completed',1.79645025000306677817e+09,1.79645025002970695499e+09,1048576,1048576,'unverified',NULL,NULL,NULL,'20261205T055729Z-09531bac.digests');
INSERT INTO "points" VALUES('20261205T055730Z-8f2baeab','/DC/vm/a2',2000,'20261205-055730-5053960f','full','/tmp/dbgen/repo/vms/DC_vm_a2-55109f71/2000/20261205T055730Z-8f2baeab.qcow2',NULL,4194304,'52 aa/3-2000',NULL,'completed',1.79645025005253672597e+09,1.79645025009999871256e+09,1048576,1048576,'unverified',NULL,NULL,NULL,'20261205T055730Z-8f2baeab.digests');
INSERT INTO "points" VALUES('20261205T055730Z-9d6b5532','/DC/vm/a2',2001,'20261205-055730-5053960f','full','/tmp/dbgen/repo/vms/DC_vm_a2-55109f71/2001/20261205T055730Z-9d6b5532.qcow2',NULL,2097152,'52 aa/3-2001',NULL,'completed',1.79645025006694436077e+09,1.79645025009999871256e+09,1048576,1048576,'unverified',NULL,NULL,NULL,'20261205T055730Z-9d6b5532.digests');
INSERT INTO "points" VALUES('20261205T055730Z-a6dbca58','/DC/vm/a4',2000,'20261205-055730-e8a34c71','full','/tmp/dbgen/repo/vms/DC_vm_a4-23600f5a/2000/20261205T055730Z-a6dbca58.qcow2',NULL,4194304,NULL,NULL,'pending',1.79645025018163418772e+09,NULL,NULL,NULL,'unverified',NULL,NULL,NULL,NULL);
INSERT INTO "points" VALUES('20261205T055730Z-0f06c8fa','/DC/vm/a4',2001,'20261205-055730-e8a34c71','full','/tmp/dbgen/repo/vms/DC_vm_a4-23600f5a/2001/20261205T055730Z-0f06c8fa.qcow2',NULL,2097152,NULL,NULL,'pending',1.79645025019124054913e+09,NULL,NULL,NULL,'unverified',NULL,NULL,NULL,NULL);
CREATE TABLE policies (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
INSERT INTO "policies" VALUES('nightly','{"name": "nightly", "node": "site-b", "vms": {"include": ["/DC/vm/a*"], "exclude": []}, "schedule": {"every": 3600.0, "timezone": "UTC"}, "verify": null, "per_policy": 1, "per_node": 4, "mode": "auto", "full_every": null, "retention": {"keep_last": 0, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0, "keep_yearly": 0}, "enabled": true, "copy": null}',1.79645024992644548409e+09,1.79645024992644548409e+09);
CREATE TABLE run_items (
    run_id TEXT NOT NULL,
    vm_path TEXT NOT NULL,
    state TEXT NOT NULL,
    job_id TEXT,
    note TEXT,
    PRIMARY KEY (run_id, vm_path)
);
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    policy TEXT NOT NULL,
    purpose TEXT NOT NULL,
    slot REAL,
    started REAL NOT NULL,
    window_end REAL,
    ended REAL,
    state TEXT NOT NULL,
    note TEXT
);
CREATE TABLE schedule_state (
    policy TEXT NOT NULL,
    purpose TEXT NOT NULL,
    last_slot REAL NOT NULL,
    next_run REAL,
    last_run REAL,
    note TEXT,
    PRIMARY KEY (policy, purpose)
);
INSERT INTO "schedule_state" VALUES('nightly','backup',1.79645024992644548409e+09,NULL,NULL,NULL);
INSERT INTO "schedule_state" VALUES('nightly','verify',1.79645024992644548409e+09,NULL,NULL,NULL);
CREATE TABLE space_samples (
    t REAL NOT NULL,
    total INTEGER NOT NULL,
    used INTEGER NOT NULL,
    free INTEGER NOT NULL
);
INSERT INTO "space_samples" VALUES(1.79645024991852569583e+09,270553174016,56661073920,52283219968);
CREATE INDEX jobs_vm ON jobs (vm_path, created);
CREATE INDEX points_disk ON points (vm_path, disk_key, created);
CREATE INDEX alerts_condition ON alerts (kind, key, cleared);
CREATE INDEX runs_policy ON runs (policy, started);
CREATE INDEX space_samples_time ON space_samples (t);
CREATE INDEX jobs_created ON jobs (created);
CREATE INDEX jobs_kind ON jobs (kind, created);
CREATE INDEX jobs_state ON jobs (state, created);
CREATE INDEX jobs_policy ON jobs (policy, created);
CREATE INDEX jobs_node ON jobs (node, created);
CREATE INDEX offsite_copies_disk ON offsite_copies (policy, vm_path, disk_key, created);
COMMIT;
