package runtimehooks

import "testing"

const (
	// kubelet writes pod UIDs into slice names with "_" for "-", since "-" nests slices.
	uid     = "0f1e8a3c-4b5d-4e6f-8a9b-0c1d2e3f4a5b"
	uidUnit = "0f1e8a3c_4b5d_4e6f_8a9b_0c1d2e3f4a5b"
	ctrID   = "6c5a9f0e1d2b3c4a5f6e7d8c9b0a1f2e3d4c5b6a7f8e9d0c1b2a3f4e5d6c7b8a"
)

func TestCanonicalCgroupPath(t *testing.T) {
	besteffortSlice := "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + uidUnit + ".slice"
	burstableSlice := "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + uidUnit + ".slice"
	tests := []struct {
		name, in, want string
	}{
		// cgroupfs driver.
		{"containerd cgroupfs container", "/kubepods/besteffort/pod" + uid + "/" + ctrID, "/kubepods/besteffort/pod" + uid + "/" + ctrID},
		{"containerd cgroupfs pod", "/kubepods/besteffort/pod" + uid, "/kubepods/besteffort/pod" + uid},
		{"kind nests kubelet", "/kubelet/kubepods/pod" + uid + "/" + ctrID, "/kubelet/kubepods/pod" + uid + "/" + ctrID},
		{"crictl cgroup_parent", "/testpods/pod-1/abc", "/testpods/pod-1/abc"},
		{"CRI-O cgroupfs container", "/kubepods/besteffort/pod" + uid + "/crio-" + ctrID, "/kubepods/besteffort/pod" + uid + "/crio-" + ctrID},
		{"relative is under the root", "kubepods/burstable/pod" + uid, "/kubepods/burstable/pod" + uid},
		{"unclean", "//kubepods//besteffort/./pod1/", "/kubepods/besteffort/pod1"},
		{"dot-dot cannot climb above the root", "/../../kubepods/../testpods", "/testpods"},
		{"root", "/", "/"},

		// systemd slice names (CgroupParent with the systemd driver).
		{"besteffort pod slice", "kubepods-besteffort-pod" + uidUnit + ".slice", besteffortSlice},
		{"burstable pod slice", "kubepods-burstable-pod" + uidUnit + ".slice", burstableSlice},
		{"guaranteed pod slice", "kubepods-pod" + uidUnit + ".slice", "/kubepods.slice/kubepods-pod" + uidUnit + ".slice"},
		{"top-level slice", "kubepods.slice", "/kubepods.slice"},
		{"system slice", "system.slice", "/system.slice"},
		{"root slice", "-.slice", "/"},
		{"user slice", "user-1000.slice", "/user.slice/user-1000.slice"},

		// runc's systemd "slice:prefix:name".
		{"containerd systemd container", "kubepods-burstable-pod" + uidUnit + ".slice:cri-containerd:" + ctrID, burstableSlice + "/cri-containerd-" + ctrID + ".scope"},
		{"CRI-O systemd container", "kubepods-besteffort-pod" + uidUnit + ".slice:crio:" + ctrID, besteffortSlice + "/crio-" + ctrID + ".scope"},
		{"docker", "system.slice:docker:1234", "/system.slice/docker-1234.scope"},
		{"empty slice is system.slice", ":cri-containerd:" + ctrID, "/system.slice/cri-containerd-" + ctrID + ".scope"},
		{"root slice scope", "-.slice:runc:abc", "/runc-abc.scope"},
		{"nested slice ignores the prefix", "kubepods.slice:cri-containerd:kubepods-besteffort.slice", "/kubepods.slice/kubepods-besteffort.slice"},

		// Already expanded systemd paths are plain paths.
		{"expanded scope", burstableSlice + "/cri-containerd-" + ctrID + ".scope", burstableSlice + "/cri-containerd-" + ctrID + ".scope"},
		{"expanded slice", besteffortSlice, besteffortSlice},
		{"bare CRI-O scope", "crio-" + ctrID + ".scope", "/crio-" + ctrID + ".scope"},
		{"relative expanded", "kubepods.slice/kubepods-besteffort.slice", "/kubepods.slice/kubepods-besteffort.slice"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := CanonicalCgroupPath(tc.in)
			if err != nil {
				t.Fatalf("CanonicalCgroupPath(%q): %v", tc.in, err)
			}
			if got != tc.want {
				t.Errorf("CanonicalCgroupPath(%q) = %q, want %q", tc.in, got, tc.want)
			}
		})
	}
}

func TestCanonicalCgroupPathErrors(t *testing.T) {
	for _, in := range []string{
		"",
		// Slice names systemd refuses.
		"-kubepods.slice",
		"kubepods-.slice",
		"kubepods--besteffort.slice",
		".slice",
		// slice:prefix:name with a bad slice, shape or name.
		"-kubepods.slice:crio:" + ctrID,
		"kube/pods.slice:crio:" + ctrID,
		"kubepods:crio:" + ctrID,
		"kubepods.slice:cri-containerd",
		"kubepods.slice:cri-containerd:a:b",
		"kubepods.slice:crio:",
		"kubepods.slice:crio:a/b",
	} {
		if got, err := CanonicalCgroupPath(in); err == nil {
			t.Errorf("CanonicalCgroupPath(%q) = %q, want an error", in, got)
		}
	}
}

func TestCgroupIDNeedsCanonicalPath(t *testing.T) {
	if _, err := CgroupID("/sys/fs/cgroup", "kubepods/x"); err == nil {
		t.Error("CgroupID accepted a relative path")
	}
}
