"""The scene of the Slicer double (see ``slicer_double.py``): node IDs, observers, the events the module observes,
singletons kept over a scene close (vtkMRMLScene::Clear), and the subject hierarchy
(vtkMRMLSubjectHierarchyNode)."""
from __future__ import annotations

from typing import Dict, List, Optional

from double_mrml import DATA_NODE_CLASSES, NODE_CLASSES, Node, Observable


class Scene(Observable):
    """Node IDs, observers and the events the module observes; ``Clear(0)`` keeps (and resets) singletons."""

    NodeAddedEvent, NodeAboutToBeRemovedEvent, NodeRemovedEvent = 66000, 66001, 66002
    StartCloseEvent, EndCloseEvent, StartImportEvent, EndImportEvent = 66003, 66004, 66005, 66006

    def __init__(self) -> None:
        super().__init__()
        self._nodes: Dict[str, Node] = {}
        self._counter: Dict[str, int] = {}
        self.subjectHierarchy = SubjectHierarchyNode(self)

    def AddNode(self, node: Node) -> Node:
        if node.singletonTag:
            existing = self.GetSingletonNode(node.singletonTag, node.className)
            if existing is not None:
                return existing
        count = self._counter.get(node.className, 0) + 1
        self._counter[node.className] = count
        node._id = f"{node.className}{count}"
        node.scene = self
        self._nodes[node._id] = node
        self.subjectHierarchy.nodeAdded(node)
        self.InvokeEvent(self.NodeAddedEvent)
        return node

    def CreateNodeByClass(self, className: str) -> Node:
        if className not in NODE_CLASSES:
            raise NotImplementedError(f"the Slicer double does not model {className}")
        return NODE_CLASSES[className]()

    def AddNewNodeByClass(self, className: str, name: str = "") -> Node:
        node = self.CreateNodeByClass(className)
        node.SetName(name or self.GenerateUniqueName(className.replace("vtkMRML", "").replace("Node", "")))
        return self.AddNode(node)

    def GenerateUniqueName(self, base: str) -> str:
        names = {n.GetName() for n in self._nodes.values()}
        if base not in names:
            return base
        index = 1
        while f"{base}_{index}" in names:
            index += 1
        return f"{base}_{index}"

    def GetNodeByID(self, nodeId: Optional[str]) -> Optional[Node]:
        return self._nodes.get(nodeId) if nodeId else None

    def RemoveNode(self, node: Node) -> None:
        if node is None or node.GetID() not in self._nodes:
            return
        self.InvokeEvent(self.NodeAboutToBeRemovedEvent)
        self._nodes.pop(node.GetID(), None)
        self.subjectHierarchy.nodeRemoved(node)
        node.scene = None
        self.InvokeEvent(self.NodeRemovedEvent)

    def GetFirstNodeByClass(self, className: str) -> Optional[Node]:
        return next((n for n in self._nodes.values() if n.IsA(className)), None)

    def GetNodesByClass(self, className: str) -> List[Node]:
        return [n for n in self._nodes.values() if n.IsA(className)]

    def GetSingletonNode(self, tag: str, className: str) -> Optional[Node]:
        return next((n for n in self._nodes.values() if n.singletonTag == tag and n.IsA(className)), None)

    def GetNumberOfNodes(self) -> int:
        return len(self._nodes)

    def Clear(self, removeSingletons: int = 0) -> None:
        """File > Close Scene: StartCloseEvent, every node removed but singletons (which are reset),
        EndCloseEvent (vtkMRMLScene::Clear)."""
        self.InvokeEvent(self.StartCloseEvent)
        for node in list(self._nodes.values()):
            if node.singletonTag and not removeSingletons:
                node.Reset()
            else:
                self._nodes.pop(node.GetID(), None)
                self.subjectHierarchy.nodeRemoved(node)
                node.scene = None
        self.InvokeEvent(self.EndCloseEvent)

    def importNodes(self, nodes: List[Node]) -> None:
        """Loading a scene file: its nodes are added between StartImportEvent and EndImportEvent."""
        self.InvokeEvent(self.StartImportEvent)
        for node in nodes:
            self.AddNode(node)
        self.InvokeEvent(self.EndImportEvent)


class SubjectHierarchyNode:
    """Items: the scene item (its own ID), then one item per data node, under the scene until moved; patients
    and studies are folders with a level (vtkMRMLSubjectHierarchyNode)."""

    def __init__(self, scene: Scene) -> None:
        self.scene = scene
        self._next = 2
        self._sceneItem = 1
        self._parent: Dict[int, int] = {}
        self._node: Dict[int, Optional[str]] = {}
        self._level: Dict[int, str] = {}
        self._name: Dict[int, str] = {}

    def _new_item(self, parent: int, nodeId: Optional[str], level: str = "", name: str = "") -> int:
        item, self._next = self._next, self._next + 1
        self._parent[item], self._node[item], self._level[item], self._name[item] = parent, nodeId, level, name
        return item

    def nodeAdded(self, node: Node) -> None:
        if any(node.IsA(kind) for kind in DATA_NODE_CLASSES) and self.GetItemByDataNode(node) == 0:
            self._new_item(self._sceneItem, node.GetID())

    def nodeRemoved(self, node: Node) -> None:
        for item, nodeId in list(self._node.items()):
            if nodeId == node.GetID():
                for table in (self._parent, self._node, self._level, self._name):
                    table.pop(item, None)

    def GetSceneItemID(self) -> int:
        return self._sceneItem

    def CreatePatientItem(self, parent: int, name: str) -> int:
        return self._new_item(parent, None, "Patient", name)

    def CreateStudyItem(self, parent: int, name: str) -> int:
        return self._new_item(parent, None, "Study", name)

    def CreateFolderItem(self, parent: int, name: str) -> int:
        return self._new_item(parent, None, "Folder", name)

    def GetItemByDataNode(self, node: Node) -> int:
        return next((item for item, nodeId in self._node.items() if node is not None and nodeId == node.GetID()), 0)

    def GetItemDataNode(self, item: int) -> Optional[Node]:
        return self.scene.GetNodeByID(self._node.get(item))

    def GetItemParent(self, item: int) -> int:
        return self._parent.get(item, 0)

    def SetItemParent(self, item: int, parent: int) -> None:
        if item in self._parent and (parent == self._sceneItem or parent in self._parent):
            self._parent[item] = parent

    def GetItemLevel(self, item: int) -> str:
        return self._level.get(item, "")

    def GetItemName(self, item: int) -> str:
        node = self.GetItemDataNode(item)
        return node.GetName() if node is not None else self._name.get(item, "")
