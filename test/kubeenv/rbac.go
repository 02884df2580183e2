package kubeenv

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"

	"github.com/podsock/podsock/test/testenv"
)

// AgentRBACFile is where the agent's RBAC lives, relative to the repository: the same
// file the install uses, so the tests check what is shipped.
const AgentRBACFile = "deploy/rbac.yaml"

// AgentRBAC is the content of AgentRBACFile: the agent's service account, the ClusterRole
// of what it may do, and the binding of one to the other.
type AgentRBAC struct {
	ServiceAccount     *corev1.ServiceAccount
	ClusterRole        *rbacv1.ClusterRole
	ClusterRoleBinding *rbacv1.ClusterRoleBinding
}

// LoadAgentRBAC reads and parses AgentRBACFile from the checkout.
func LoadAgentRBAC() (*AgentRBAC, error) {
	root, err := testenv.RepoRoot()
	if err != nil {
		return nil, err
	}
	path := filepath.Join(root, AgentRBACFile)
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	r, err := ParseAgentRBAC(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return r, nil
}

// ParseAgentRBAC parses a multi-document YAML stream holding exactly one ServiceAccount,
// one ClusterRole and one ClusterRoleBinding, and nothing else.
func ParseAgentRBAC(data []byte) (*AgentRBAC, error) {
	r := &AgentRBAC{}
	docs := yaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for n := 1; ; n++ {
		doc, err := docs.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", n, err)
		}
		if len(bytes.TrimSpace(stripComments(doc))) == 0 {
			continue
		}
		obj, _, err := scheme.Codecs.UniversalDeserializer().Decode(doc, nil, nil)
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", n, err)
		}
		switch o := obj.(type) {
		case *corev1.ServiceAccount:
			err = setOnce(&r.ServiceAccount, o)
		case *rbacv1.ClusterRole:
			err = setOnce(&r.ClusterRole, o)
		case *rbacv1.ClusterRoleBinding:
			err = setOnce(&r.ClusterRoleBinding, o)
		default:
			err = fmt.Errorf("unexpected %T", obj)
		}
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", n, err)
		}
	}
	if r.ServiceAccount == nil || r.ClusterRole == nil || r.ClusterRoleBinding == nil {
		return nil, errors.New("want a ServiceAccount, a ClusterRole and a ClusterRoleBinding")
	}
	return r, nil
}

func setOnce[T any](dst **T, v *T) error {
	if *dst != nil {
		return fmt.Errorf("a second %T", v)
	}
	*dst = v
	return nil
}

// stripComments drops the comment lines of a YAML document, so a document of comments
// only counts as empty.
func stripComments(doc []byte) []byte {
	var out []byte
	for line := range bytes.Lines(doc) {
		if !bytes.HasPrefix(bytes.TrimSpace(line), []byte("#")) {
			out = append(out, line...)
		}
	}
	return out
}

// ServiceAccountUser is the user name the API server gives the service account, e.g.
// system:serviceaccount:kube-system:podsock; with ServiceAccountGroups it is the identity
// to mint a certificate for (UserConfig) to act as the agent's service account.
func (r *AgentRBAC) ServiceAccountUser() string {
	return "system:serviceaccount:" + r.ServiceAccount.Namespace + ":" + r.ServiceAccount.Name
}

// ServiceAccountGroups are the groups the API server puts every such account in.
func (r *AgentRBAC) ServiceAccountGroups() []string {
	return []string{"system:serviceaccounts", "system:serviceaccounts:" + r.ServiceAccount.Namespace}
}

// ApplyAgentRBAC creates every object of AgentRBACFile as it is, and returns them.
func (s *Server) ApplyAgentRBAC(t testenv.TB) *AgentRBAC {
	t.Helper()
	r, c := s.loadAgentRBAC(t)
	ctx := context.Background()
	err := ensureNamespace(ctx, c, r.ServiceAccount.Namespace)
	if err == nil {
		err = create(ctx, c.CoreV1().ServiceAccounts(r.ServiceAccount.Namespace), r.ServiceAccount)
	}
	if err == nil {
		err = create(ctx, c.RbacV1().ClusterRoles(), r.ClusterRole)
	}
	if err == nil {
		err = create(ctx, c.RbacV1().ClusterRoleBindings(), r.ClusterRoleBinding)
	}
	if err != nil {
		t.Fatalf("kubeenv: apply %s: %v", AgentRBACFile, err)
	}
	return r
}

// GrantAgentRole gives user what the agent may do: the ClusterRole of AgentRBACFile,
// bound to that user by a ClusterRoleBinding of its own.
func (s *Server) GrantAgentRole(t testenv.TB, user string) {
	t.Helper()
	r, _ := s.loadAgentRBAC(t)
	s.GrantRole(t, user, r.ClusterRole)
}

// GrantRole creates role (unless it exists) and binds it to user with a
// ClusterRoleBinding of its own: for a test of what a narrower or other role does.
func (s *Server) GrantRole(t testenv.TB, user string, role *rbacv1.ClusterRole) {
	t.Helper()
	c := s.AdminClient(t)
	ctx := context.Background()
	binding := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: role.Name + ":" + user},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role.Name},
		Subjects:   []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: user}},
	}
	err := create(ctx, c.RbacV1().ClusterRoles(), role)
	if err == nil {
		err = create(ctx, c.RbacV1().ClusterRoleBindings(), binding)
	}
	if err != nil {
		t.Fatalf("kubeenv: grant %s to %s: %v", role.Name, user, err)
	}
}

// loadAgentRBAC is LoadAgentRBAC and an admin client to apply it with.
func (s *Server) loadAgentRBAC(t testenv.TB) (*AgentRBAC, *kubernetes.Clientset) {
	t.Helper()
	r, err := LoadAgentRBAC()
	if err != nil {
		t.Fatalf("kubeenv: %v", err)
	}
	return r, s.AdminClient(t)
}

// creator is the Create of a typed client-go resource interface.
type creator[T any] interface {
	Create(ctx context.Context, obj T, opts metav1.CreateOptions) (T, error)
}

// create creates obj; one that exists already (the same file applied twice) is left as
// it is.
func create[T any](ctx context.Context, c creator[T], obj T) error {
	if _, err := c.Create(ctx, obj, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	return nil
}

// ensureNamespace creates namespace name unless it exists (the API server creates
// kube-system itself, but maybe not yet).
func ensureNamespace(ctx context.Context, c kubernetes.Interface, name string) error {
	return create(ctx, c.CoreV1().Namespaces(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}})
}
