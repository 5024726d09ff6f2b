// Fault injection: STATE/faults/<MethodName> makes the next call(s) of that vSphere method fail.
//
// Compiled into govmomi's simulator package like sendense_ext.go. File content (first word):
// empty or "always" = every call fails until the file is removed; an integer N = the next N calls
// fail (the file is rewritten with N-1, deleted at 0). An optional second word picks the fault:
// FileFault (default), TaskInProgress, InvalidState or SystemError. Task methods end their task in
// state error without running (so a failed RemoveSnapshot_Task removes nothing); other methods
// (QueryChangedDiskAreas) answer with a SOAP fault. TaskInProgress names the failed task itself, so
// a method that is not a task gets InvalidState instead.

package simulator

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// sdTaskMethods maps a simulator task's descriptionId to the vSphere method that created it.
var sdTaskMethods = map[string]string{
	"VirtualMachine.createSnapshot":           "CreateSnapshot_Task",
	"VirtualMachine.reconfigVm":               "ReconfigVM_Task",
	"VirtualMachine.RemoveAllSnapshots":       "RemoveAllSnapshots_Task",
	"VirtualMachine.revertSnapshot":           "RevertToCurrentSnapshot_Task",
	"VirtualMachine.powerOn":                  "PowerOnVM_Task",
	"VirtualMachine.powerOff":                 "PowerOffVM_Task",
	"VirtualMachine.destroy":                  "Destroy_Task",
	"VirtualMachineSnapshot.removeSnapshot":   "RemoveSnapshot_Task",
	"VirtualMachineSnapshot.revertToSnapshot": "RevertToSnapshot_Task",
}

func (e *sendenseExt) faultPath(method string) string {
	return filepath.Join(e.cfg.StateDir, "faults", method)
}

// injectedFault consumes one use of STATE/faults/<method>; nil when the call must not fail.
// task is the call's task (nil for a method that is not a task).
func (e *sendenseExt) injectedFault(method string, entity, task *types.ManagedObjectReference) (string, types.BaseMethodFault) {
	e.mu.Lock()
	defer e.mu.Unlock()
	p := e.faultPath(method)
	b, err := os.ReadFile(p)
	if err != nil {
		return "", nil // no file (or unreadable): no fault
	}
	words := strings.Fields(string(b))
	count, kind := "always", "FileFault"
	if len(words) > 0 {
		count = words[0]
	}
	if len(words) > 1 {
		kind = words[1]
	}
	what := method
	if entity != nil {
		what += " on " + entity.Value
	}
	msg := fmt.Sprintf("%s failed: fault injected by %s", what, p)
	if count != "always" {
		n, err := strconv.Atoi(count)
		switch {
		case err != nil || n < 0 || len(words) > 2:
			return fmt.Sprintf("%s (malformed fault file %q)", msg, strings.TrimSpace(string(b))),
				&types.SystemError{Reason: "malformed fault file " + p}
		case n == 0:
			_ = os.Remove(p)
			return "", nil
		case n == 1:
			_ = os.Remove(p)
		default:
			_ = os.WriteFile(p, []byte(strconv.Itoa(n-1)+"\n"), 0o644)
		}
	}
	switch kind {
	case "TaskInProgress":
		if task != nil {
			return msg, &types.TaskInProgress{Task: *task}
		}
		return msg, &types.InvalidState{}
	case "InvalidState":
		return msg, &types.InvalidState{}
	case "SystemError":
		return msg, &types.SystemError{Reason: msg}
	case "FileFault":
		return msg, &types.FileFault{File: p}
	default:
		return msg + " (unknown fault " + kind + ")", &types.SystemError{Reason: "unknown fault " + kind + " in " + p}
	}
}

// injectTaskFault runs in PutObject for a new task: when its method has a fault file, the task
// fails with the injected fault instead of running.
func (e *sendenseExt) injectTaskFault(t *Task) {
	method, ok := sdTaskMethods[t.Info.DescriptionId]
	if !ok {
		return
	}
	msg, fault := e.injectedFault(method, t.Info.Entity, &t.Self)
	if fault == nil {
		return
	}
	e.mu.Lock()
	e.taskFaults[t.Self.Value] = msg
	e.mu.Unlock()
	t.Execute = func(*Task) (types.AnyType, types.BaseMethodFault) { return nil, fault }
}

// fixTaskFaultMessage runs in UpdateObject: Task.Run sets the fault's message to its Go type
// name; an injected fault gets its own message instead.
func (e *sendenseExt) fixTaskFaultMessage(obj mo.Reference, changes []types.PropertyChange) {
	t, ok := obj.(*mo.Task)
	if !ok {
		return
	}
	e.mu.Lock()
	msg, ok := e.taskFaults[t.Self.Value]
	if ok && t.Info.Error != nil {
		delete(e.taskFaults, t.Self.Value)
	}
	e.mu.Unlock()
	if !ok || t.Info.Error == nil {
		return
	}
	t.Info.Error.LocalizedMessage = msg
	for i := range changes {
		if f, ok := changes[i].Val.(types.LocalizedMethodFault); ok && changes[i].Name == "info.error" {
			f.LocalizedMessage = msg
			changes[i].Val = f
		}
	}
}
