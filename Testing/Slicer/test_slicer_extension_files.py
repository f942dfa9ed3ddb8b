"""The extension's files agree with each other and with the code: every widget Med3D.py uses exists in the .ui file,
bound widgets name real parameters, every .py file and resource is listed in the module's CMakeLists.txt, the
extension metadata is consistent, the icon is a 128x128 PNG, and a CMake build (with a stand-in for Slicer's
CMake macros) really copies and installs the med3dcore sources next to Med3D.py."""
from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "Med3DSlicer"
UI = MODULE / "Resources" / "UI" / "Med3D.ui"


def ui_widgets() -> dict:
    tree = ET.parse(UI)
    return {w.get("name"): w for w in tree.iter("widget")}


def module_ast() -> ast.Module:
    return ast.parse((MODULE / "Med3D.py").read_text())


def test_every_widget_the_code_uses_exists_in_the_ui_file() -> None:
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "Med3D.py").read_text()))
    assert "applyButton" in used and len(used) > 15
    missing = used - set(ui_widgets())
    assert not missing, f"Med3D.py uses widgets that Med3D.ui lacks: {sorted(missing)}"


def parameter_names() -> set:
    for node in module_ast().body:
        if isinstance(node, ast.ClassDef) and node.name == "Med3DParameterNode":
            return {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError("Med3DParameterNode not found")


def test_bound_widgets_name_existing_parameters() -> None:
    bound = {}
    for name, widget in ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = prop.find("string").text
    assert bound["inputVolumeSelector"] == "inputVolume" and bound["taskComboBox"] == "task"
    unknown = set(bound.values()) - parameter_names()
    assert not unknown, f"widgets bound to parameters that do not exist: {sorted(unknown)}"


def test_task_combo_items_are_the_parameter_choices() -> None:
    import sys
    sys.path.insert(0, str(MODULE))
    from Med3DLib.models import TASK_TITLES

    combo = ui_widgets()["taskComboBox"]
    items = [item.find("property/string").text for item in combo.findall("item")]
    assert items == list(TASK_TITLES.values())


def cmake_list(name: str) -> list:
    text = (MODULE / "CMakeLists.txt").read_text()
    block = re.search(rf"set\({name}\s+(.*?)\)", text, re.S).group(1)
    return [entry.replace("${MODULE_NAME}", "Med3D") for entry in block.split()]


def test_cmakelists_lists_every_python_file_and_resource() -> None:
    scripts = set(cmake_list("MODULE_PYTHON_SCRIPTS"))
    resources = set(cmake_list("MODULE_PYTHON_RESOURCES"))
    on_disk_py = {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts}
    on_disk_resources = {p.relative_to(MODULE).as_posix() for p in (MODULE / "Resources").rglob("*") if p.is_file()}
    assert scripts == on_disk_py, f"unlisted: {on_disk_py - scripts}, listed but missing: {scripts - on_disk_py}"
    assert resources == on_disk_resources, f"unlisted: {on_disk_resources - resources}, missing: " \
                                           f"{resources - on_disk_resources}"


def test_extension_metadata_is_consistent() -> None:
    root = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', root)
    assert "add_subdirectory(Med3DSlicer)" in root
    category = re.search(r'set\(EXTENSION_CATEGORY "([^"]+)"\)', root).group(1)
    for key in ("HOMEPAGE", "CONTRIBUTORS", "DESCRIPTION", "ICONURL"):
        assert re.search(rf'set\(EXTENSION_{key} "[^"]+"\)', root), f"EXTENSION_{key} is empty"
    entry = json.loads((ROOT / "Med3D.json").read_text())
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                       "slicer-extension-catalog-entry-schema-")
    assert entry["category"] == category and entry["build_dependencies"] == ["PyTorch"]
    assert set(entry) <= {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision",
                          "scm_url", "scm_type", "tier", "enabled"}
    s4ext = dict(line.split(" ", 1) for line in (ROOT / "Med3D.s4ext").read_text().splitlines()
                 if line.strip() and not line.startswith("#") and " " in line)
    assert s4ext["depends"] == "PyTorch" and s4ext["category"] == category
    assert s4ext["scmurl"] == entry["scm_url"]
    module_categories = re.search(r"self\.parent\.categories = \[(.*?)\]", (MODULE / "Med3D.py").read_text()).group(1)
    assert f'"{category}"' in module_categories


def test_icon_is_a_small_128_pixel_png() -> None:
    from PIL import Image

    path = MODULE / "Resources" / "Icons" / "Med3D.png"
    with Image.open(path) as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)
    assert path.stat().st_size < 20_000


# A stand-in for the parts of Slicer's CMake that the extension uses. ctkMacroCompilePythonScript copies at build
# time and installs the destination folder, as CTK's does (byte-compiling is left out); it is not Slicer's code.
FAKE_USE_SLICER = r"""
macro(ctkMacroCompilePythonScript)
  cmake_parse_arguments(MY "NO_INSTALL_SUBDIR;GLOBAL_TARGET" "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR"
                        "SCRIPTS;RESOURCES" ${ARGN})
  if(NOT MY_SOURCE_DIR)
    set(MY_SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR})
  endif()
  set(_copied)
  foreach(file ${MY_SCRIPTS} ${MY_RESOURCES})
    add_custom_command(OUTPUT ${MY_DESTINATION_DIR}/${file} DEPENDS ${MY_SOURCE_DIR}/${file}
      COMMAND ${CMAKE_COMMAND} -E copy ${MY_SOURCE_DIR}/${file} ${MY_DESTINATION_DIR}/${file})
    list(APPEND _copied ${MY_DESTINATION_DIR}/${file})
  endforeach()
  add_custom_target(Copy${MY_TARGET_NAME}PythonFiles ALL DEPENDS ${_copied})
  install(DIRECTORY ${MY_DESTINATION_DIR}/ DESTINATION ${MY_INSTALL_DIR})
endmacro()
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY_SLICER "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(value ${MY_SLICER_SCRIPTS} ${MY_SLICER_RESOURCES})
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${value})
      message(FATAL_ERROR "slicerMacroBuildScriptedModule given nonexistent file '${value}'")
    endif()
  endforeach()
  ctkMacroCompilePythonScript(TARGET_NAME ${MY_SLICER_NAME} SCRIPTS "${MY_SLICER_SCRIPTS}"
    RESOURCES "${MY_SLICER_RESOURCES}" DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}
    INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR} NO_INSTALL_SUBDIR)
endmacro()
function(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT" "" ${ARGN})
  file(APPEND ${CMAKE_BINARY_DIR}/unittests.txt "${MY_SCRIPT}\n")
endfunction()
"""
FAKE_CONFIG = """
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
"""


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                    reason="cmake and a C++ compiler are needed to configure the extension")
def test_cmake_build_and_install_carry_med3dcore_next_to_the_module(tmp_path: Path) -> None:
    fake = tmp_path / "FakeSlicer"
    fake.mkdir()
    (fake / "SlicerConfig.cmake").write_text(FAKE_CONFIG)
    (fake / "UseSlicer.cmake").write_text(FAKE_USE_SLICER)
    (fake / "Empty.cmake").write_text("")
    build, install = tmp_path / "build", tmp_path / "install"
    run = lambda *args: subprocess.run(["cmake", *args], capture_output=True, text=True, timeout=300)
    configured = run("-S", str(ROOT), "-B", str(build), f"-DSlicer_DIR={fake}", "-DBUILD_TESTING=ON")
    assert configured.returncode == 0, configured.stdout + configured.stderr
    built = run("--build", str(build))
    assert built.returncode == 0, built.stdout + built.stderr
    installed = run("--install", str(build), "--prefix", str(install))
    assert installed.returncode == 0, installed.stdout + installed.stderr

    engine = sorted(p.relative_to(ROOT / "Med3DCore").as_posix()
                    for p in (ROOT / "Med3DCore" / "med3dcore").rglob("*.py") if "__pycache__" not in p.parts)
    assert "med3dcore/__init__.py" in engine and "med3dcore/cli/__init__.py" in engine
    for tree in (build, install):
        modules = tree / "lib" / "Slicer-5.8" / "qt-scripted-modules"
        for relative in engine + ["Med3D.py", "Med3DLib/runner.py", "Resources/UI/Med3D.ui",
                                  "Resources/Icons/Med3D.png"]:
            assert (modules / relative).is_file(), f"{relative} is missing from {modules}"
        assert (modules / "med3dcore" / "volume.py").read_bytes() == \
            (ROOT / "Med3DCore" / "med3dcore" / "volume.py").read_bytes()
    assert (build / "unittests.txt").read_text().split() == ["Med3D.py"]
