"""The project's modules form layers whose imports only point down or sideways within a layer, and no two modules
import each other, even through others or from inside a function (read from the source with `ast`): a capability
added later cannot bring a cycle back, nor a file reader into a model file."""
import ast
import os

from conftest import ROOT

# Layer of each module (STYLE.md, "Layers"): a module may import its own layer's and lower ones, where the weights
# and the ML layers stand side by side and import neither the other.
LAYERS = {
    'base': {'errors', 'files', 'utils'},
    'models': {'vovnet', 'deeplab'},
    'weights': {'checkpoints', 'imagenet', 'published', 'deployed', 'weights'},
    'ml': {'engine', 'inference', 'quantize', 'pascal', 'synthetic', 'plots'},
    'commands': {'main', 'evaluation', 'runs', 'predict', 'export', 'benchmark', 'demo', 'hub'},
}
MAY_IMPORT = {'base': {'base'}, 'models': {'base', 'models'}, 'weights': {'base', 'models', 'weights'},
              'ml': {'base', 'models', 'ml'}, 'commands': set(LAYERS)}


def project_modules() -> set[str]:
    return {f[:-3] for f in os.listdir(ROOT) if f.endswith('.py')}


def imports(module: str, modules: set[str]) -> set[str]:
    """The project's modules `module` imports anywhere in its source (top level or inside functions)."""
    return imports_in(open(os.path.join(ROOT, f'{module}.py')).read(), modules) - {module}


def imports_in(source: str, modules: set[str]) -> set[str]:
    tree = ast.parse(source)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split('.')[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split('.')[0])
    return found & modules


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports(m, modules) for m in modules}


def test_every_module_has_a_layer():
    placed = set().union(*LAYERS.values())
    assert project_modules() == placed, 'place the new module in a layer: ' + ', '.join(project_modules() ^ placed)


def test_imports_point_down_the_layers():
    layer_of = {m: layer for layer, members in LAYERS.items() for m in members}
    wrong = [f'{m} ({layer_of[m]}) imports {d} ({layer_of[d]})' for m, deps in graph().items() for d in deps
             if layer_of[d] not in MAY_IMPORT[layer_of[m]]]
    assert not wrong, wrong


def test_no_import_cycles():
    edges = graph()
    state, cycles = {}, []

    def visit(module, path):
        state[module] = 'open'
        for dep in sorted(edges[module]):
            if state.get(dep) == 'open':
                cycles.append(' -> '.join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = 'done'
    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_model_files_import_only_the_base_and_read_no_file():
    edges = graph()
    assert edges['vovnet'] <= {'errors', 'utils'}
    assert edges['deeplab'] <= {'errors', 'utils', 'vovnet'}
    for module in ('vovnet', 'deeplab'):
        source = open(os.path.join(ROOT, f'{module}.py')).read()
        for reader in ('torch.load(', 'open(', 'load_file(', 'load_state_dict_from_url('):
            assert reader not in source, f'{module}.py calls {reader}'


def test_the_imports_are_read_inside_functions_too():
    """Imports inside functions count: the kind of arrow that hid the last cycles."""
    source = 'import os\nfrom errors import UserError\n\ndef f():\n    import hub\n    from pascal import MEAN\n'
    assert imports_in(source, project_modules()) == {'errors', 'hub', 'pascal'}
