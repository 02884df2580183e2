package netns

// Seams for the tests of package netns_test.
var (
	NsGetID = &nsGetID
	Setns   = &setns
	RunIn   = runIn
)
