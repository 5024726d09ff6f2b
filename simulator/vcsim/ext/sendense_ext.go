// Sendense additions to the govmomi simulator package.
//
// This file is not a package of its own: build-vcsim.sh adds it to
// github.com/vmware/govmomi/simulator with `go build -overlay`, so it can use
// the simulator's unexported helpers. It adds:
//   - per-disk raw data files, CBT ids and change logs under a state directory,
//   - frozen per-snapshot copies of the data files and VMware-style change IDs,
//   - VirtualMachine.QueryChangedDiskAreas (paged),
//   - capacityInBytes, backing.uuid, host sslThumbprint,
//   - the VM (not the snapshot) as the entity of snapshot tasks,
//   - an HTTP manifest endpoint (/sendense/manifest) for the vddk stand-in,
//   - fault injection through STATE/faults/<MethodName> (sendense_faults.go).

package simulator

import (
	"bufio"
	"crypto/rand"
	"crypto/sha1"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/vmware/govmomi/simulator/internal"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	sdSeekData = 3 // SEEK_DATA on Linux
	sdSeekHole = 4 // SEEK_HOLE on Linux
)

// SendenseConfig configures the extension.
type SendenseConfig struct {
	StateDir  string // root of the state directory
	PageBytes int64  // max span covered by one QueryChangedDiskAreas answer
}

// SendenseSnapDisk is the frozen state of one disk in one snapshot.
type SendenseSnapDisk struct {
	Key       int32  `json:"key"`
	FileName  string `json:"fileName"`
	Capacity  int64  `json:"capacityInBytes"`
	Path      string `json:"path"`
	CbtID     string `json:"cbtId,omitempty"`
	Seq       int    `json:"seq"`
	ChangeID  string `json:"changeId,omitempty"`
	LivePath  string `json:"livePath"`
	LogPath   string `json:"changeLog"`
	CbtIDPath string `json:"cbtIdFile"`
}

// SendenseSnapshot is the frozen state of one snapshot.
type SendenseSnapshot struct {
	Moref string             `json:"moref"`
	VM    string             `json:"vm"`
	Disks []SendenseSnapDisk `json:"disks"`
}

type sendenseExt struct {
	cfg        SendenseConfig
	mu         sync.Mutex
	snaps      map[string]*SendenseSnapshot
	taskFaults map[string]string // task moref -> message of its injected fault
	self       types.ManagedObjectReference
}

var sdExt *sendenseExt

// SendenseInstall registers the extension with the current Map. Call after Model.Create.
func SendenseInstall(cfg SendenseConfig) error {
	if cfg.PageBytes <= 0 {
		cfg.PageBytes = 4 << 20
	}
	for _, d := range []string{"disks", "changes", "snapshots", "faults"} {
		if err := os.MkdirAll(filepath.Join(cfg.StateDir, d), 0o755); err != nil {
			return err
		}
	}
	sdExt = &sendenseExt{
		cfg:        cfg,
		snaps:      make(map[string]*SendenseSnapshot),
		taskFaults: make(map[string]string),
		self:       types.ManagedObjectReference{Type: "SendenseHook", Value: "sendense-hook-1"},
	}
	Map.AddHandler(sdExt)

	// Replace the PropertyCollector singleton by our wrapper type; Session.Get makes the
	// per-session collectors with the singleton's type, so they get our Fetch too.
	pc := &sendensePropertyCollector{}
	pc.Self = Map.content().PropertyCollector
	Map.Put(pc)
	return nil
}

// sendensePropertyCollector fixes Fetch (pyvmomi's property accessor) for unset properties:
// vSphere answers with no value (None in pyvmomi), the stock simulator panics.
type sendensePropertyCollector struct {
	PropertyCollector
}

func (pc *sendensePropertyCollector) Fetch(ctx *Context, req *internal.Fetch) soap.HasFault {
	if req.This == vim25.ServiceInstance {
		return pc.PropertyCollector.Fetch(ctx, req)
	}
	this := req.This
	if ctx.Map.Get(this) == nil && this.Type == "ManagedEntity" {
		for _, o := range ctx.Map.All("") {
			if o.Reference().Value == this.Value {
				this = o.Reference()
				break
			}
		}
	}
	res := pc.PropertyCollector.RetrievePropertiesEx(ctx, &types.RetrievePropertiesEx{
		SpecSet: []types.PropertyFilterSpec{{
			PropSet:   []types.PropertySpec{{Type: this.Type, PathSet: []string{req.Prop}}},
			ObjectSet: []types.ObjectSpec{{Obj: this}},
		}}})
	if res.Fault() != nil {
		return res
	}
	body := new(internal.FetchBody)
	objs := res.(*methods.RetrievePropertiesExBody).Res.Returnval.Objects
	switch {
	case len(objs) == 0:
		body.Fault_ = Fault("The object has already been deleted or has not been completely created",
			&types.ManagedObjectNotFound{Obj: req.This})
	case len(objs[0].PropSet) > 0:
		body.Res = &internal.FetchResponse{Returnval: objs[0].PropSet[0].Val}
	case len(objs[0].MissingSet) > 0:
		f := objs[0].MissingSet[0].Fault
		body.Fault_ = Fault(f.LocalizedMessage, f.Fault)
	default:
		body.Res = &internal.FetchResponse{} // unset property
	}
	return body
}

// --- state dir layout -------------------------------------------------------

func (e *sendenseExt) livePath(vm string, key int32) string {
	return filepath.Join(e.cfg.StateDir, "disks", vm, fmt.Sprintf("%d.raw", key))
}

func (e *sendenseExt) logPath(vm string, key int32) string {
	return filepath.Join(e.cfg.StateDir, "changes", vm, fmt.Sprintf("%d.jsonl", key))
}

func (e *sendenseExt) cbtIDPath(vm string, key int32) string {
	return filepath.Join(e.cfg.StateDir, "changes", vm, fmt.Sprintf("%d.cbtid", key))
}

func (e *sendenseExt) snapDir(snap string) string {
	return filepath.Join(e.cfg.StateDir, "snapshots", snap)
}

// NewSendenseCbtID returns a random id in VMware's format: "52 xx xx xx xx xx xx xx-xx xx xx xx xx xx xx xx".
func NewSendenseCbtID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	b[0] = 0x52
	h := make([]string, 16)
	for i := range b {
		h[i] = fmt.Sprintf("%02x", b[i])
	}
	return strings.Join(h[:8], " ") + "-" + strings.Join(h[8:], " ")
}

func (e *sendenseExt) readCbtID(vm string, key int32) (string, error) {
	p := e.cbtIDPath(vm, key)
	b, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		id := NewSendenseCbtID()
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return "", err
		}
		return id, os.WriteFile(p, []byte(id+"\n"), 0o644)
	}
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

type sdArea struct {
	Offset int64 `json:"offset"`
	Length int64 `json:"length"`
}

// readLog returns all records of a disk's change log (missing file = no records).
func (e *sendenseExt) readLog(vm string, key int32) ([]sdArea, error) {
	f, err := os.Open(e.logPath(vm, key))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []sdArea
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		var a sdArea
		if err := json.Unmarshal([]byte(line), &a); err != nil {
			return nil, fmt.Errorf("%s: bad record %q: %v", e.logPath(vm, key), line, err)
		}
		out = append(out, a)
	}
	return out, sc.Err()
}

// ensureDisk creates the sparse data file of a disk (kept if it already exists with that size).
func (e *sendenseExt) ensureDisk(vm string, key int32, capacity int64) error {
	p := e.livePath(vm, key)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if st.Size() != capacity {
		if err := f.Truncate(capacity); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(filepath.Dir(e.logPath(vm, key)), 0o755); err != nil {
		return err
	}
	_, err = e.readCbtID(vm, key)
	return err
}

// sdExtents lists the data extents of a file with SEEK_DATA/SEEK_HOLE, limited to [0,size).
func sdExtents(f *os.File, size int64) ([]sdArea, error) {
	var out []sdArea
	var off int64
	for off < size {
		data, err := f.Seek(off, sdSeekData)
		if err != nil {
			if errors.Is(err, syscall.ENXIO) {
				break
			}
			return nil, err
		}
		if data >= size {
			break
		}
		hole, err := f.Seek(data, sdSeekHole)
		if err != nil {
			return nil, err
		}
		if hole > size {
			hole = size
		}
		out = append(out, sdArea{Offset: data, Length: hole - data})
		off = hole
	}
	return out, nil
}

// sdSparseCopy copies src to dst, writing only data extents (holes stay holes).
func sdSparseCopy(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	tmp := dst + ".tmp"
	out, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o444)
	if err != nil {
		return err
	}
	ok := false
	defer func() {
		out.Close()
		if !ok {
			os.Remove(tmp)
		}
	}()
	exts, err := sdExtents(in, st.Size())
	if err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	for _, x := range exts {
		for off := x.Offset; off < x.Offset+x.Length; {
			n := int64(len(buf))
			if rest := x.Offset + x.Length - off; rest < n {
				n = rest
			}
			if _, err := in.ReadAt(buf[:n], off); err != nil && err != io.EOF {
				return err
			}
			if _, err := out.WriteAt(buf[:n], off); err != nil {
				return err
			}
			off += n
		}
	}
	if err := out.Truncate(st.Size()); err != nil {
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	ok = true
	return os.Rename(tmp, dst)
}

// --- model fixes ------------------------------------------------------------

func sdDiskUUID(vmUUID string, key int32) string {
	h := sha1.Sum([]byte(fmt.Sprintf("%s/%d", vmUUID, key)))
	x := fmt.Sprintf("%x", h[:])
	return fmt.Sprintf("6000C29%s-%s-%s-%s-%s", x[0:1], x[1:5], x[5:9], x[9:13], x[13:25])
}

// sdFixDisks fills capacityInBytes and backing.uuid of a device list.
func sdFixDisks(vmUUID string, devices []types.BaseVirtualDevice) {
	for _, d := range devices {
		disk, ok := d.(*types.VirtualDisk)
		if !ok {
			continue
		}
		if disk.CapacityInBytes == 0 {
			disk.CapacityInBytes = disk.CapacityInKB * 1024
		}
		if disk.CapacityInKB == 0 {
			disk.CapacityInKB = disk.CapacityInBytes / 1024
		}
		if b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok && b.Uuid == "" {
			b.Uuid = sdDiskUUID(vmUUID, disk.Key)
		}
	}
}

func sdDisks(vm *VirtualMachine) []*types.VirtualDisk {
	var out []*types.VirtualDisk
	if vm.Config == nil {
		return nil
	}
	for _, d := range vm.Config.Hardware.Device {
		if disk, ok := d.(*types.VirtualDisk); ok {
			out = append(out, disk)
		}
	}
	return out
}

func sdFileName(disk *types.VirtualDisk) string {
	if b, ok := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo); ok {
		return b.GetVirtualDeviceFileBackingInfo().FileName
	}
	return ""
}

// SendensePrepareVMs fixes the disks of every VM and creates their data files.
func SendensePrepareVMs() error {
	for _, ent := range Map.All("VirtualMachine") {
		vm := ent.(*VirtualMachine)
		var err error
		Map.WithLock(vm, func() {
			sdFixDisks(vm.Config.Uuid, vm.Config.Hardware.Device)
			for i, disk := range sdDisks(vm) {
				if disk.DeviceInfo != nil {
					disk.DeviceInfo.GetDescription().Label = fmt.Sprintf("Hard disk %d", i+1)
				}
				if err = sdExt.ensureDisk(vm.Self.Value, disk.Key, disk.CapacityInBytes); err != nil {
					return
				}
			}
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// SendenseSetHostThumbprint sets summary.config.sslThumbprint of every host.
func SendenseSetHostThumbprint(sha1Thumbprint string) {
	for _, ent := range Map.All("HostSystem") {
		h := ent.(*HostSystem)
		Map.WithLock(h, func() {
			h.Summary.Config.SslThumbprint = sha1Thumbprint
		})
	}
}

// --- RegisterObject hooks ---------------------------------------------------

func (e *sendenseExt) Reference() types.ManagedObjectReference { return e.self }

func (e *sendenseExt) PutObject(item mo.Reference) {
	switch o := item.(type) {
	case *Task:
		e.injectTaskFault(o)
		// vSphere reports the VM as the entity of snapshot tasks; pyvmomi expects a ManagedEntity here.
		if o.Info.Entity != nil && o.Info.Entity.Type == "VirtualMachineSnapshot" {
			if s, ok := Map.Get(*o.Info.Entity).(*VirtualMachineSnapshot); ok {
				ref := s.Vm
				o.Info.Entity = &ref
				if vm, ok := Map.Get(ref).(*VirtualMachine); ok {
					o.Info.EntityName = vm.Name
				}
			}
		}
	case *VirtualMachineSnapshot:
		if err := e.freeze(o); err != nil {
			fmt.Fprintf(os.Stderr, "sendense: freezing snapshot %s: %v\n", o.Self.Value, err)
		}
	}
}

func (e *sendenseExt) UpdateObject(obj mo.Reference, changes []types.PropertyChange) {
	e.fixTaskFaultMessage(obj, changes)
}

func (e *sendenseExt) RemoveObject(ref types.ManagedObjectReference) {
	if ref.Type != "VirtualMachineSnapshot" {
		return
	}
	e.mu.Lock()
	delete(e.snaps, ref.Value)
	e.mu.Unlock()
	_ = os.RemoveAll(e.snapDir(ref.Value))
}

// freeze runs inside CreateSnapshot_Task (the VM is locked by the caller): it gives the
// snapshot its own copy of the disk devices with backing.changeId set and copies the data files.
func (e *sendenseExt) freeze(s *VirtualMachineSnapshot) error {
	vm, ok := Map.Get(s.Vm).(*VirtualMachine)
	if !ok {
		return fmt.Errorf("vm %s not found", s.Vm)
	}
	cbt := vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
	vmID := vm.Self.Value
	snap := &SendenseSnapshot{Moref: s.Self.Value, VM: vmID}
	dir := e.snapDir(s.Self.Value)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	devices := make([]types.BaseVirtualDevice, 0, len(s.Config.Hardware.Device))
	for _, d := range s.Config.Hardware.Device {
		disk, ok := d.(*types.VirtualDisk)
		if !ok {
			devices = append(devices, d)
			continue
		}
		c := *disk
		if b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
			nb := *b
			c.Backing = &nb
		}
		sdFixDisks(vm.Config.Uuid, []types.BaseVirtualDevice{&c})
		sd := SendenseSnapDisk{
			Key:       c.Key,
			FileName:  sdFileName(&c),
			Capacity:  c.CapacityInBytes,
			Path:      filepath.Join(dir, fmt.Sprintf("%d.raw", c.Key)),
			LivePath:  e.livePath(vmID, c.Key),
			LogPath:   e.logPath(vmID, c.Key),
			CbtIDPath: e.cbtIDPath(vmID, c.Key),
		}
		if err := e.ensureDisk(vmID, c.Key, c.CapacityInBytes); err != nil {
			return err
		}
		recs, err := e.readLog(vmID, c.Key)
		if err != nil {
			return err
		}
		sd.Seq = len(recs)
		if err := sdSparseCopy(sd.LivePath, sd.Path); err != nil {
			return err
		}
		if cbt {
			id, err := e.readCbtID(vmID, c.Key)
			if err != nil {
				return err
			}
			sd.CbtID = id
			sd.ChangeID = fmt.Sprintf("%s/%d", id, sd.Seq)
			if b, ok := c.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
				b.ChangeId = sd.ChangeID
			}
		}
		devices = append(devices, &c)
		snap.Disks = append(snap.Disks, sd)
	}
	s.Config.Hardware.Device = devices // Config is a copy of the VM's; the slice is now the snapshot's own
	meta, _ := json.MarshalIndent(snap, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, "meta.json"), meta, 0o644); err != nil {
		return err
	}
	e.mu.Lock()
	e.snaps[snap.Moref] = snap
	e.mu.Unlock()
	return nil
}

// --- QueryChangedDiskAreas --------------------------------------------------

func sdMerge(areas []sdArea) []sdArea {
	sort.Slice(areas, func(i, j int) bool { return areas[i].Offset < areas[j].Offset })
	var out []sdArea
	for _, a := range areas {
		if a.Length <= 0 {
			continue
		}
		if n := len(out); n > 0 && a.Offset <= out[n-1].Offset+out[n-1].Length {
			end := a.Offset + a.Length
			if end > out[n-1].Offset+out[n-1].Length {
				out[n-1].Length = end - out[n-1].Offset
			}
			continue
		}
		out = append(out, a)
	}
	return out
}

func sdInvalidArg(prop string) types.BaseMethodFault {
	return &types.InvalidArgument{InvalidProperty: prop}
}

func (e *sendenseExt) queryChangedDiskAreas(vm *VirtualMachine, req *types.QueryChangedDiskAreas) (*types.DiskChangeInfo, string, types.BaseMethodFault) {
	snapRef := req.Snapshot
	if snapRef == nil {
		if vm.Snapshot == nil || vm.Snapshot.CurrentSnapshot == nil {
			return nil, "snapshot required", sdInvalidArg("snapshot")
		}
		snapRef = vm.Snapshot.CurrentSnapshot
	}
	e.mu.Lock()
	snap := e.snaps[snapRef.Value]
	e.mu.Unlock()
	if snap == nil || snap.VM != vm.Self.Value {
		return nil, "snapshot not found", &types.ManagedObjectNotFound{Obj: *snapRef}
	}
	var sd *SendenseSnapDisk
	for i := range snap.Disks {
		if snap.Disks[i].Key == req.DeviceKey {
			sd = &snap.Disks[i]
		}
	}
	if sd == nil {
		return nil, "A specified parameter was not correct: deviceKey", sdInvalidArg("deviceKey")
	}
	fileFault := func(why string) (*types.DiskChangeInfo, string, types.BaseMethodFault) {
		return nil, "Error caused by file " + sd.FileName + ": " + why, &types.FileFault{File: sd.FileName}
	}
	cbt := vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled
	if !cbt || sd.CbtID == "" {
		return fileFault("change tracking is not enabled")
	}
	if req.StartOffset < 0 || req.StartOffset >= sd.Capacity {
		return nil, "A specified parameter was not correct: startOffset", sdInvalidArg("startOffset")
	}
	var areas []sdArea
	if req.ChangeId == "*" {
		f, err := os.Open(sd.Path)
		if err != nil {
			return fileFault(err.Error())
		}
		areas, err = sdExtents(f, sd.Capacity)
		f.Close()
		if err != nil {
			return fileFault(err.Error())
		}
	} else {
		i := strings.LastIndex(req.ChangeId, "/")
		if i <= 0 {
			return nil, "A specified parameter was not correct: changeId", sdInvalidArg("changeId")
		}
		n, err := strconv.Atoi(req.ChangeId[i+1:])
		if err != nil || n < 0 {
			return nil, "A specified parameter was not correct: changeId", sdInvalidArg("changeId")
		}
		cur, err := e.readCbtID(vm.Self.Value, sd.Key)
		if err != nil {
			return fileFault(err.Error())
		}
		if req.ChangeId[:i] != cur || req.ChangeId[:i] != sd.CbtID || n > sd.Seq {
			return fileFault("change ID " + req.ChangeId + " is not valid for this disk")
		}
		recs, err := e.readLog(vm.Self.Value, sd.Key)
		if err != nil {
			return fileFault(err.Error())
		}
		if len(recs) < sd.Seq {
			return fileFault("change log shorter than snapshot sequence")
		}
		areas = append(areas, recs[n:sd.Seq]...)
		for k := range areas {
			if areas[k].Offset+areas[k].Length > sd.Capacity {
				areas[k].Length = sd.Capacity - areas[k].Offset
			}
		}
	}
	areas = sdMerge(areas)

	// One page: [start, end), extended so that an area is never split.
	start := req.StartOffset
	end := start + e.cfg.PageBytes
	if end > sd.Capacity {
		end = sd.Capacity
	}
	info := &types.DiskChangeInfo{StartOffset: start}
	for _, a := range areas {
		aEnd := a.Offset + a.Length
		if aEnd <= start {
			continue
		}
		if a.Offset >= end {
			break
		}
		if a.Offset < start {
			a.Length -= start - a.Offset
			a.Offset = start
		}
		if aEnd > end {
			end = aEnd
		}
		info.ChangedArea = append(info.ChangedArea, types.DiskChangeExtent{Start: a.Offset, Length: a.Length})
	}
	info.Length = end - start
	return info, "", nil
}

// QueryChangedDiskAreas implements the vSphere method on VirtualMachine.
func (vm *VirtualMachine) QueryChangedDiskAreas(ctx *Context, req *types.QueryChangedDiskAreas) soap.HasFault {
	body := &methods.QueryChangedDiskAreasBody{}
	if sdExt == nil {
		body.Fault_ = Fault("not supported", &types.NotSupported{})
		return body
	}
	if msg, fault := sdExt.injectedFault("QueryChangedDiskAreas", &vm.Self, nil); fault != nil {
		body.Fault_ = Fault(msg, fault)
		return body
	}
	res, msg, fault := sdExt.queryChangedDiskAreas(vm, req)
	if fault != nil {
		body.Fault_ = Fault(msg, fault)
		return body
	}
	body.Res = &types.QueryChangedDiskAreasResponse{Returnval: *res}
	return body
}

// --- manifest ---------------------------------------------------------------

// SendenseDisk describes one disk of a VM in the manifest.
type SendenseDisk struct {
	Key       int32  `json:"key"`
	Label     string `json:"label"`
	FileName  string `json:"fileName"`
	Capacity  int64  `json:"capacityInBytes"`
	UUID      string `json:"uuid"`
	Path      string `json:"path"`
	LogPath   string `json:"changeLog"`
	CbtIDPath string `json:"cbtIdFile"`
}

// SendenseVM describes one VM in the manifest.
type SendenseVM struct {
	Name      string             `json:"name"`
	Path      string             `json:"path"`
	Moref     string             `json:"moref"`
	UUID      string             `json:"uuid"`
	CBT       bool               `json:"changeTrackingEnabled"`
	Disks     []SendenseDisk     `json:"disks"`
	Snapshots []SendenseSnapshot `json:"snapshots"`
}

func sdInventoryPath(ref types.ManagedObjectReference) string {
	var names []string
	for {
		ent, ok := Map.Get(ref).(mo.Entity)
		if !ok {
			break
		}
		me := ent.Entity()
		if me.Parent == nil {
			break // root folder
		}
		names = append([]string{me.Name}, names...)
		ref = *me.Parent
	}
	return "/" + strings.Join(names, "/")
}

// SendenseManifest returns the VMs with their disks and frozen snapshots, sorted by inventory path.
func SendenseManifest() []SendenseVM {
	var out []SendenseVM
	for _, ent := range Map.All("VirtualMachine") {
		vm := ent.(*VirtualMachine)
		var v SendenseVM
		Map.WithLock(vm, func() {
			v = SendenseVM{Name: vm.Name, Moref: vm.Self.Value, UUID: vm.Config.Uuid,
				CBT: vm.Config.ChangeTrackingEnabled != nil && *vm.Config.ChangeTrackingEnabled}
			for _, d := range sdDisks(vm) {
				label := ""
				if d.DeviceInfo != nil {
					label = d.DeviceInfo.GetDescription().Label
				}
				uuid := ""
				if b, ok := d.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok {
					uuid = b.Uuid
				}
				v.Disks = append(v.Disks, SendenseDisk{
					Key: d.Key, Label: label, FileName: sdFileName(d), Capacity: d.CapacityInBytes, UUID: uuid,
					Path:      sdExt.livePath(vm.Self.Value, d.Key),
					LogPath:   sdExt.logPath(vm.Self.Value, d.Key),
					CbtIDPath: sdExt.cbtIDPath(vm.Self.Value, d.Key),
				})
			}
		})
		v.Path = sdInventoryPath(vm.Self)
		sdExt.mu.Lock()
		for _, s := range sdExt.snaps {
			if s.VM == v.Moref {
				v.Snapshots = append(v.Snapshots, *s)
			}
		}
		sdExt.mu.Unlock()
		sort.Slice(v.Snapshots, func(i, j int) bool { return v.Snapshots[i].Moref < v.Snapshots[j].Moref })
		v.Snapshots = append([]SendenseSnapshot{}, v.Snapshots...)
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	return out
}

// SendenseManifestHandler serves {"stateDir":..., "vms":[...]} as JSON.
func SendenseManifestHandler(extra map[string]interface{}) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		doc := map[string]interface{}{}
		for k, v := range extra {
			doc[k] = v
		}
		doc["stateDir"] = sdExt.cfg.StateDir
		doc["vms"] = SendenseManifest()
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(doc)
	}
}
